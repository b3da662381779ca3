"""`bench pools --split auto`: the input length that gives each pool about half of a trace's prefill *work*.

Splitting the Mooncake conversation trace at a short length (8,192) gives the short pool ~46 % of the requests
but only ~11 % of the prefill work, so the long pool's 2 workers run near saturation while the short ones idle.
Work per request is the mocker's own prefill cost (engines/mocker/timing.py) of its uncached tokens in 8,192-
token steps; a request's cached prefix is the longest run of its leading ``hash_ids`` that an earlier request
of the trace already had (a trace-wide cache: an estimate, since each pool has its own cache).
"""

from __future__ import annotations

import math

from dynamo_grpc.bench.replay_trace import Trace
from dynamo_grpc.engines.mocker.timing import prefill_ms

#: the mocker's default step budget (max_num_batched_tokens): a longer prefill takes several steps
STEP_TOKENS = 8192


def prefill_work_ms(new_tokens: int, step_tokens: int = STEP_TOKENS) -> float:
    """Mocker milliseconds to prefill ``new_tokens`` uncached tokens, chunked by the step budget."""
    full, rest = divmod(max(new_tokens, 0), step_tokens)
    return full * prefill_ms(step_tokens) + prefill_ms(rest)


def uncached_tokens(trace: Trace) -> list[int]:
    """Each request's prompt tokens not covered by a prefix some earlier request of the trace had."""
    bs = trace.hash_block_size
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in trace.requests:
        if not r.hash_ids or not bs:
            out.append(r.input_length)
            continue
        hit = 0
        for k in range(1, len(r.hash_ids) + 1):
            prefix = r.hash_ids[:k]
            if prefix in seen:
                hit = k
            else:
                seen.add(prefix)
        out.append(max(r.input_length - hit * bs, 0))
    return out


def work_balanced_split(trace: Trace, short_share: float = 0.5) -> int:
    """The input length ``t`` (one of the trace's, so both sides keep a request) whose shorter requests carry
    the share of the prefill work closest to ``short_share``."""
    if not 0 < short_share < 1:
        raise ValueError(f"short_share must be in (0, 1), got {short_share}")
    lengths = [r.input_length for r in trace.requests]
    if len(set(lengths)) < 2:
        raise ValueError("the trace needs at least two different input lengths to split")
    work = [prefill_work_ms(n) for n in uncached_tokens(trace)]
    target = short_share * sum(work)
    by_len = sorted(zip(lengths, work, strict=True))
    best, best_gap, acc = by_len[-1][0], math.inf, 0.0
    for i in range(1, len(by_len)):
        acc += by_len[i - 1][1]
        cut = by_len[i][0]
        if cut > by_len[i - 1][0] and abs(acc - target) < best_gap:  # requests below ``cut`` are short
            best, best_gap = cut, abs(acc - target)
    return best


def cross_pool_prefix_tokens(trace: Trace, split: int) -> int:
    """Prompt tokens whose prefix an earlier request cached on the other side of ``split``: the prefill a split
    by length adds over one pool (a conversation's turn that crosses the cut recomputes its history)."""
    bs = trace.hash_block_size
    if not bs:
        return 0
    owner: dict[tuple[int, ...], bool] = {}  # prefix -> cached by a short request
    lost = 0
    for r in trace.requests:
        short = r.input_length < split
        hit, side = 0, short
        for k in range(1, len(r.hash_ids or ()) + 1):
            prefix = (r.hash_ids or ())[:k]
            if prefix in owner:
                hit, side = k, owner[prefix]
            else:
                owner[prefix] = short
        if hit and side != short:
            lost += min(hit * bs, r.input_length)
    return lost
