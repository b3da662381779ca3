"""Choosing a worker: the cost of DESIGN.md, temperature, the busy threshold, and baselines.

cost(w) = prefill_load_scale * max(prefill_blocks_if_routed(w) - overlap(w), 0) + decode_blocks(w)

where prefill_blocks_if_routed is the worker's pending prefill plus this prompt's blocks and
decode_blocks is what it is decoding plus the blocks this request would add there: its prompt and
expected output less the overlap, since cached prefix blocks are shared in the paged cache rather
than copied (as Dynamo's active-sequence accounting counts unique blocks). The load term is what
stops herding: a shared system prompt cached on one worker stops winning once that worker's load
exceeds what it saves.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from dynamo_grpc.router.ranks import BoolArray, FloatArray

WorkerKey = Hashable


class NoWorkers(Exception):
    """No live worker can take the request (UNAVAILABLE)."""


class AllBusy(Exception):
    """Every worker is over the busy threshold (RESOURCE_EXHAUSTED)."""


@dataclass
class Candidate:
    """What the policy knows about one worker rank for one request."""

    key: WorkerKey
    overlap: int = 0
    pending_prefill: int = 0
    decode_blocks: int = 0
    #: fraction of KV in use from the worker's LoadMetrics (None: unknown)
    kv_usage: float | None = None


@dataclass
class Choice:
    key: WorkerKey
    overlap: int
    prefill_cost: float
    decode_cost: float

    @property
    def total(self) -> float:
        return self.prefill_cost + self.decode_cost


def not_busy(cands: Sequence[Candidate], busy_threshold: float) -> list[Candidate]:
    """Candidates under the threshold; AllBusy if there were some and none is."""
    if not cands:
        raise NoWorkers("no live worker")
    if busy_threshold >= 1.0:
        return cands if isinstance(cands, list) else list(cands)
    free = [c for c in cands if c.kv_usage is None or c.kv_usage <= busy_threshold]
    if not free:
        raise AllBusy(f"all {len(cands)} workers are over the busy threshold {busy_threshold:.2f}")
    return free


def costs(cands: Sequence[Candidate], prompt_blocks: int, decode_new: int, scale: float) -> list[Choice]:
    out = []
    for c in cands:
        pf = c.pending_prefill + prompt_blocks - c.overlap
        dec = float(c.decode_blocks + max(decode_new - c.overlap, 0))
        out.append(Choice(c.key, c.overlap, scale * pf if pf > 0 else 0.0, dec))
    return out


def pick(choices: Sequence[Choice], temperature: float, rng: random.Random) -> Choice:
    """Temperature 0: lowest cost, ties broken at random. Otherwise softmax over normalised costs."""
    if not choices:
        raise NoWorkers("no live worker")
    totals = [c.total for c in choices]
    if temperature <= 0 or len(choices) == 1:
        best = min(totals)
        ties = [c for c, t in zip(choices, totals, strict=True) if t == best]
        return ties[0] if len(ties) == 1 else rng.choice(ties)
    lo, hi = min(totals), max(totals)
    span = hi - lo
    if span == 0:
        return rng.choice(list(choices))
    logits = [-(t - lo) / span / temperature for t in totals]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return rng.choices(list(choices), weights=weights, k=1)[0]


# ---- vectorised (the router's hot path): one float64 entry per rank slot ------------------------


def cost_scores(
    prefill: FloatArray,
    decode: FloatArray,
    overlap_slots: list[int],
    overlap_depths: list[int],
    scale: float,
) -> FloatArray:
    """Per rank, the cost of :func:`costs` minus ``scale * prompt_blocks + decode_new`` (the same for all).

    ``scale * (prefill + prompt - overlap) + decode + decode_new - overlap``: the clamps at 0 of
    :func:`costs` never apply here, since a rank's overlap is at most the prompt's blocks (and so at
    most ``decode_new``) and its pending prefill is never negative. Dropping the common constant
    changes neither the argmin nor the min-max-normalised softmax, and saves an array op per
    decision. Overlap is sparse (only the ranks that hold the first block), so it comes as
    (slot, depth) lists.
    """
    if scale == 1.0:
        score = prefill + decode
    else:
        score = prefill * scale
        score += decode
    credit = scale + 1.0  # a cached block is neither prefilled nor newly held
    if len(overlap_slots) <= 8:  # element updates beat building index arrays for a few ranks
        for slot, depth in zip(overlap_slots, overlap_depths, strict=True):
            score[slot] -= credit * depth
    else:
        score[np.array(overlap_slots)] -= np.array(overlap_depths, dtype=np.float64) * credit
    return score


def busy_filter(ok: BoolArray | None, usage: FloatArray, busy_threshold: float) -> BoolArray | None:
    """``ok`` (None: every rank) minus ranks over the threshold (NaN usage: unknown, never busy).

    AllBusy if none is left.
    """
    if busy_threshold >= 1.0:
        return ok
    free = ~(usage > busy_threshold)
    if ok is not None:
        free &= ok
    if not free.any():
        n = len(usage) if ok is None else int(ok.sum())
        raise AllBusy(f"all {n} workers are over the busy threshold {busy_threshold:.2f}")
    return free


def prefill_busy_filter(ok: BoolArray | None, prefill_blocks: FloatArray, limit_blocks: float) -> BoolArray | None:
    """``ok`` minus ranks whose pending prefill exceeds ``limit_blocks`` (Dynamo's router queue threshold).

    AllBusy if none is left: the caller queues the request in the router rather than adding to an
    engine's prefill backlog that is already longer than ``limit_blocks``.
    """
    free = prefill_blocks <= limit_blocks
    if ok is not None:
        free &= ok
    if not free.any():
        n = len(prefill_blocks) if ok is None else int(ok.sum())
        raise AllBusy(f"all {n} workers have more than {limit_blocks:g} blocks of prefill pending")
    return free


def pick_slot(
    score: FloatArray,
    ok: BoolArray | None,
    temperature: float,
    rng: random.Random,
    tiebreak: FloatArray | None = None,
) -> int:
    """:func:`pick` over the slots where ``ok`` (None: all): argmin, or softmax.

    Ties at temperature 0 go to the slot with the lowest ``tiebreak`` (the workers' reported waiting +
    running requests: what the router's own accounting cannot see), then at random.
    ``score`` may be modified (masked slots are set to +inf).
    """
    if ok is not None:
        score[~ok] = np.inf
    best = score[score.argmin()]  # argmin is a direct C call; ndarray.min() goes through Python
    if best == np.inf or best != best:
        raise NoWorkers("no live worker")
    if temperature <= 0:
        ties = (score == best).nonzero()[0]
        if len(ties) > 1 and tiebreak is not None:
            tb = tiebreak[ties]
            ties = ties[tb == tb.min()]
        return int(ties[0]) if len(ties) == 1 else int(ties[rng.randrange(len(ties))])
    slots = (score != np.inf).nonzero()[0]
    t = score[slots]
    span = t.max() - best
    if span == 0:
        return int(slots[rng.randrange(len(slots))])
    weights = np.exp((best - t) / (span * temperature))  # the cheapest has weight 1
    cum = np.cumsum(weights)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(slots[min(i, len(slots) - 1)])
