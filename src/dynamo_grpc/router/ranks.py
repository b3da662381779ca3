"""Per-rank routing state in dense numpy arrays, so a decision is a few vector ops, not a Python loop.

Every routable worker rank (instance_id, dp_rank) gets a slot 0..n-1. The arrays hold what the
cost and the busy check need: active prefill/decode blocks (kept current by deltas from
:class:`~dynamo_grpc.router.active.ActiveSequences`), KV usage from LoadMetrics (NaN: none yet)
and the KV capacity from discovery Meta (0: unknown). The table is rebuilt from scratch when the
worker set changes (rare, O(ranks)); load changes are O(1) element updates.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

import numpy as np
import numpy.typing as npt

RankKey = tuple[str, int]  # (instance_id, dp_rank)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


class RankTable:
    """Dense slots for the routable ranks and their load (read by the vectorised policy)."""

    def __init__(
        self,
        ranks: Iterable[tuple[RankKey, str, int]],
        load_of: Callable[[RankKey], tuple[int, int]] = lambda _k: (0, 0),
        usage_of: Mapping[RankKey, float] | None = None,
        reported_of: Mapping[RankKey, int] | None = None,
    ) -> None:
        """``ranks``: (key, grpc_address, kv_blocks) per rank; ``load_of``: its current (prefill, decode)."""
        rows = list(ranks)
        self.keys: list[RankKey] = [k for k, _, _ in rows]
        self.addresses: list[str] = [a for _, a, _ in rows]
        self.slot_of: dict[RankKey, int] = {k: i for i, k in enumerate(self.keys)}
        self.slots_of_instance: dict[str, list[int]] = {}
        for i, (iid, _) in enumerate(self.keys):
            self.slots_of_instance.setdefault(iid, []).append(i)
        n = len(rows)
        self.n = n
        # float64 throughout: the cost is a float and mixed-dtype ops would upcast per decision
        self.prefill: FloatArray = np.zeros(n)
        self.decode: FloatArray = np.zeros(n)
        self.capacity: FloatArray = np.array([float(c) for _, _, c in rows], dtype=np.float64)
        self.usage: FloatArray = np.full(n, np.nan)
        #: waiting + running requests each rank last reported (LoadMetrics); the tie-break
        self.reported: FloatArray = np.zeros(n)
        for i, key in enumerate(self.keys):
            self.prefill[i], self.decode[i] = load_of(key)
        if usage_of:
            for rank, frac in usage_of.items():
                self.set_usage(rank, frac)
        if reported_of:
            for rank, queued in reported_of.items():
                self.set_reported(rank, queued)
        self.all_slots: BoolArray = np.ones(n, dtype=np.bool_)

    def add_load(self, key: Hashable, d_prefill: int, d_decode: int) -> None:
        """A sequence on ``key`` changed its active blocks by these deltas (unknown ranks are ignored)."""
        slot = self.slot_of.get(key)  # type: ignore[call-overload]
        if slot is not None:
            self.prefill[slot] += d_prefill
            self.decode[slot] += d_decode

    def set_usage(self, key: Hashable, fraction: float) -> None:
        slot = self.slot_of.get(key)  # type: ignore[call-overload]
        if slot is not None:
            self.usage[slot] = fraction

    def set_reported(self, key: Hashable, queued: int) -> None:
        slot = self.slot_of.get(key)  # type: ignore[call-overload]
        if slot is not None:
            self.reported[slot] = queued

    def allowed(self, exclude: Iterable[str]) -> BoolArray:
        """Slots not belonging to an excluded instance (a fresh array; the shared one when none)."""
        ex = [s for iid in exclude for s in self.slots_of_instance.get(iid, ())]
        if not ex:
            return self.all_slots
        ok = self.all_slots.copy()
        ok[ex] = False
        return ok

    def estimated_usage(self) -> FloatArray:
        """KV usage per rank: LoadMetrics if any came, else the router's own active blocks over capacity.

        NaN where neither is known (such a rank is never busy).
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            own = np.where(self.capacity > 0, (self.prefill + self.decode) / self.capacity, np.nan)
        return np.where(np.isnan(self.usage), own, self.usage)
