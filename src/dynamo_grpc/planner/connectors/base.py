"""The connector interface: how many replicas each pool has, and set that number."""

from __future__ import annotations

from typing import Protocol


class ConnectorError(RuntimeError):
    """A scaling action failed; the message names the pool and the cause."""


class Connector(Protocol):
    async def replicas(self) -> dict[str, int]:
        """Replicas per pool that take work or are starting (draining ones excluded)."""
        ...

    async def scale(self, pool: str, replicas: int) -> None:
        """Set ``pool`` to ``replicas``. Fewer: the least-loaded workers are drained first, never killed mid-stream."""
        ...

    async def close(self) -> None: ...
