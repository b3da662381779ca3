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

_PAIR = struct.Struct("<QQ")
_TWO64 = float(1 << 64)


class HashSampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], eos_probability: float, seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_sorted = sorted(self.eos_token_ids)
        self.eos_probability = eos_probability
        self.seed = seed & 0xFFFFFFFFFFFFFFFF

    def request_key(self, prompt: list[int], seed: int | None) -> int:
        if seed is not None:
            return int(seed) & 0xFFFFFFFFFFFFFFFF
        return xxhash.xxh3_64_intdigest(np.asarray(prompt, dtype="<u4").tobytes(), seed=self.seed)

    def token_at(self, key: int, position: int, ignore_eos: bool) -> int:
        """The token at ``position`` (the number of tokens before it) of the request with ``key``."""
        # The position is absolute, so a seeded request migrated as prompt + output so far
        # continues the same stream on another worker.
        h = xxhash.xxh3_128_intdigest(_PAIR.pack(key, position), seed=self.seed)
        lo, hi = h & 0xFFFFFFFFFFFFFFFF, h >> 64
        if self._eos_sorted and not ignore_eos and self.eos_probability > 0:
            if hi / _TWO64 < self.eos_probability:
                return self._eos_sorted[hi % len(self._eos_sorted)]
        n = self.vocab_size - len(self._eos_sorted)
        tok = lo % n
        for e in self._eos_sorted:  # skip over the EOS ids so the draw stays uniform on the rest
            if tok >= e:
                tok += 1
        return int(tok)
