"""Tracks in-flight streams so a draining worker knows when it is idle (no grpc here)."""

from __future__ import annotations

import asyncio

from dynamo_grpc.errors import Draining

__all__ = ["DrainGate", "Draining"]


class DrainGate:
    """``enter()``/``leave()`` bracket each stream; after ``start_drain()`` ``enter()`` refuses.

    ``handing_back`` is set when the grace period ran out: streams still running end with
    UNAVAILABLE so their clients resend them (prompt + tokens so far) to another worker.
    """

    def __init__(self) -> None:
        self.draining = False
        self.handing_back = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start_drain(self) -> None:
        self.draining = True

    def enter(self) -> None:
        """Count a new stream in, or raise Draining."""
        if self.draining:
            raise Draining("worker is draining")
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every stream finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
