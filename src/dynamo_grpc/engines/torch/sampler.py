"""Turn a batch of last-position logits into tokens, following each request's SamplingParams.

Semantics follow vLLM: repetition penalty over prompt+output tokens (divide positive
logits, multiply negative ones), frequency/presence penalties over output tokens,
then temperature, top-k, top-p, min-p. Temperature 0 is greedy. Each seeded request
draws from its own ``torch.Generator``, so its samples do not depend on what else is
in the batch. Logprobs are of the model's raw distribution (vLLM's default
``raw_logprobs``). Before the penalties, as vLLM's logits processors: ``allowed_token_ids``
masks every other id, ``bad_words`` bans the last token of a bad word whose earlier tokens end
the output so far, ``logit_bias`` is added, and while fewer than ``min_tokens`` are out, EOS and
stop ids are masked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dynamo_grpc.engines.base import SamplingParams, TokenLogprob

_EPS = 1e-5


@dataclass
class SampleRow:
    """What the sampler needs to know about one request."""

    sampling: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


def needs_sampling(sp: SamplingParams) -> bool:
    return sp.temperature >= _EPS and sp.top_k != 1


def _constrained(sp: SamplingParams) -> bool:
    return bool(sp.bad_words or sp.allowed_token_ids is not None or sp.logit_bias)


def _apply_constraints(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    """allowed_token_ids, bad_words and logit_bias on one row of logits (in place)."""
    sp = row.sampling
    if sp.allowed_token_ids is not None:
        keep = torch.full_like(logits, float("-inf"))
        ids = torch.tensor(sp.allowed_token_ids, dtype=torch.long)
        keep[ids] = logits[ids]
        logits.copy_(keep)
    if sp.bad_words:
        out = row.output_token_ids
        banned = [
            w[-1] for w in sp.bad_words if len(w) <= len(out) + 1 and (len(w) == 1 or out[-(len(w) - 1) :] == w[:-1])
        ]
        if banned:
            logits[torch.tensor(banned, dtype=torch.long)] = float("-inf")
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(sp.logit_bias.values()), dtype=logits.dtype)
    return logits


def _apply_penalties(logits: torch.Tensor, row: SampleRow) -> torch.Tensor:
    sp = row.sampling
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
    if (sp.frequency_penalty or sp.presence_penalty) and row.output_token_ids:
        out = torch.tensor(row.output_token_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits -= sp.frequency_penalty * counts
        logits -= sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _filter(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row of logits (returns probabilities)."""
    logits = logits / sp.temperature
    vocab = logits.numel()
    if 0 < sp.top_k < vocab:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) > sp.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    if sp.min_p > 0.0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
    return probs


def sample(logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token (and optional logprobs) per row of ``logits`` ([N, vocab], any float dtype)."""
    logits = logits.float()
    want_lp = [r.sampling.logprobs is not None for r in rows]
    raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    tokens: list[int] = [0] * len(rows)

    simple = [
        i
        for i, r in enumerate(rows)
        if not needs_sampling(r.sampling)
        and r.sampling.repetition_penalty == 1.0
        and not r.sampling.frequency_penalty
        and not r.sampling.presence_penalty
        and len(r.output_token_ids) >= r.sampling.min_tokens
        and not _constrained(r.sampling)
    ]
    if simple:
        # every row greedy (the common batch): no gathered copy of the [N, vocab] logits
        chosen = logits if len(simple) == len(rows) else logits[torch.tensor(simple, dtype=torch.long)]
        for i, t in zip(simple, chosen.argmax(dim=-1).tolist(), strict=True):
            tokens[i] = int(t)
    simple_set = set(simple)
    for i, r in enumerate(rows):
        if i in simple_set:
            continue
        sp = r.sampling
        row = logits[i].clone()
        if _constrained(sp):
            row = _apply_constraints(row, r)
        row = _apply_penalties(row, r)
        if len(r.output_token_ids) < sp.min_tokens:
            banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(r.eos_token_ids))
            banned = {b for b in banned if 0 <= b < row.numel()}
            if banned:
                row[torch.tensor(sorted(banned), dtype=torch.long)] = float("-inf")
        if not needs_sampling(sp):
            tokens[i] = int(row.argmax())
            continue
        probs = _filter(row, sp)
        gen = r.generator if r.generator is not None else make_generator(sp.seed)
        r.generator = gen
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())

    lps: list[TokenLogprob | None] = [None] * len(rows)
    if raw_lp is not None:
        for i, r in enumerate(rows):
            n = r.sampling.logprobs
            if n is None:
                continue
            lp_row = raw_lp[i]
            top: list[tuple[int, float]] = []
            if n > 0:
                v, ix = torch.topk(lp_row, min(n, lp_row.numel()))
                top = [(int(a), float(b)) for a, b in zip(ix.tolist(), v.tolist(), strict=True)]
            chosen = lp_row[tokens[i]]
            rank = int((lp_row > chosen).sum()) + 1
            lps[i] = TokenLogprob(tokens[i], float(chosen), top, rank)
    return tokens, lps
