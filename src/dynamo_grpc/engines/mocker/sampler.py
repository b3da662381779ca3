"""Deterministic "sampling": a token is a hash of (request key, position), not a model's choice.

The key is the request's seed when it has one, else a hash of its prompt; the engine seed is
mixed into both. So the same request on the same seeded engine yields the same tokens on any
worker (and after a migration, which re-sends prompt + output), and different prompts differ.
EOS is drawn only with probability ``eos_probability`` (never under ignore_eos); otherwise the
token is uniform over the vocabulary minus the EOS ids.
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

from .request import MockRequest

_PAIR = struct.Struct("<QQ")
_TWO64 = float(1 << 64)


class HashSampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], eos_probability: float, seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_sorted = sorted(self.eos_token_ids)
        self.eos_probability = eos_probability
        self.seed = seed & 0xFFFFFFFFFFFFFFFF
        self._keys: dict[str, int] = {}

    def request_key(self, req: MockRequest) -> int:
        if req.sampling.seed is not None:
            return int(req.sampling.seed) & 0xFFFFFFFFFFFFFFFF
        key = self._keys.get(req.request_id)
        if key is None:
            data = np.asarray(req.prompt, dtype="<u4").tobytes()
            key = xxhash.xxh3_64_intdigest(data, seed=self.seed)
            self._keys[req.request_id] = key
        return key

    def forget(self, req: MockRequest) -> None:
        self._keys.pop(req.request_id, None)

    def next_token(self, req: MockRequest) -> int:
        """The token at position ``req.num_tokens`` (the next one) for this request."""
        # The position is absolute, so a seeded request migrated as prompt + output so far
        # continues the same stream on another worker.
        h = xxhash.xxh3_128_intdigest(_PAIR.pack(self.request_key(req), req.num_tokens), seed=self.seed)
        lo, hi = h & 0xFFFFFFFFFFFFFFFF, h >> 64
        if self._eos_sorted and not req.sampling.ignore_eos and self.eos_probability > 0:
            if hi / _TWO64 < self.eos_probability:
                return self._eos_sorted[hi % len(self._eos_sorted)]
        n = self.vocab_size - len(self._eos_sorted)
        tok = lo % n
        for e in self._eos_sorted:  # skip over the EOS ids so the draw stays uniform on the rest
            if tok >= e:
                tok += 1
        return int(tok)
