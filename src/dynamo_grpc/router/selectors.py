"""How a worker rank is chosen, picked once per router from its mode (Dynamo's injected selector).

The router finds the allowed ranks (exclusions, busy threshold) and hands them to one selector:
`KvSelector` (cache overlap from an index, then the cost of policy.py), `RoundRobinSelector` or
`RandomSelector`. No method branches on the mode string.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from dynamo_grpc.router.policy import cost_scores, pick_slot
from dynamo_grpc.router.ranks import BoolArray, RankTable

Overlaps = Callable[[Sequence[int]], dict[Hashable, int]]


class Selector(Protocol):
    def select(self, table: RankTable, ok: BoolArray | None, hashes: list[int]) -> tuple[int, int]:
        """(slot, overlap blocks) among the slots where ``ok`` (None: all); ``ok`` has at least one."""
        ...


class KvSelector:
    """Overlap from ``overlaps`` (the event-fed index, or the approximate one), then min cost or softmax."""

    def __init__(self, overlaps: Overlaps, scale: float, temperature: float, rng: random.Random) -> None:
        self.overlaps = overlaps
        self.scale = scale
        self.temperature = temperature
        self.rng = rng

    def select(self, table: RankTable, ok: BoolArray | None, hashes: list[int]) -> tuple[int, int]:
        found = self.overlaps(hashes)
        slots: list[int] = []
        depths: list[int] = []
        if found:
            slot_of = table.slot_of
            for key, depth in found.items():
                s = slot_of.get(key)  # type: ignore[call-overload]
                if s is not None:
                    slots.append(s)
                    depths.append(depth)
        score = cost_scores(table.prefill, table.decode, slots, depths, self.scale)
        slot = pick_slot(score, ok, self.temperature, self.rng, table.reported)
        return slot, found.get(table.keys[slot], 0) if found else 0


def _allowed(table: RankTable, ok: BoolArray | None) -> list[int]:
    return list(range(table.n)) if ok is None else ok.nonzero()[0].tolist()


class RoundRobinSelector:
    """Baseline: the next allowed rank in a stable (instance id, rank) order."""

    def __init__(self) -> None:
        self._n = 0

    def select(self, table: RankTable, ok: BoolArray | None, hashes: list[int]) -> tuple[int, int]:
        ordered = sorted(_allowed(table, ok), key=lambda i: table.keys[i])
        slot = ordered[self._n % len(ordered)]
        self._n += 1
        return slot, 0


class RandomSelector:
    """Baseline: a uniform choice among the allowed ranks."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def select(self, table: RankTable, ok: BoolArray | None, hashes: list[int]) -> tuple[int, int]:
        return self.rng.choice(_allowed(table, ok)), 0
