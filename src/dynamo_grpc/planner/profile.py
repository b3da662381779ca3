"""What one worker can do, measured by ``dynamo-grpc profile`` and read by the planner.

A profile holds two sweeps of one worker, in seconds as a client of the frontend sees them:

* prefill: TTFT of a lone request per input length (ISL) -> prefill tokens/s of one replica at that ISL;
* decode: ITL and output tokens/s with ``concurrency`` streams of ``context`` tokens each.

Lookups interpolate linearly between measured points and clamp at the ends (never extrapolate).

The worker's KV cache (``kv_tokens``: blocks x block size, read from its registration) bounds how many streams it can
hold at once, whatever its ITL curve says: like Dynamo's profiler, the decode sweep stops at the concurrency the
cache holds, and the decode capacity at a context is capped at ``kv_streams(context) / ITL``.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "dynamo-grpc-profile/1"


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class PrefillPoint:
    isl: int
    ttft_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.isl / self.ttft_s


@dataclass(frozen=True, slots=True)
class DecodePoint:
    concurrency: int
    context: int
    itl_s: float
    #: output tokens per second the replica delivered over the whole point (queueing included)
    tokens_per_s: float


@dataclass
class Profile:
    engine: str
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]
    #: how the profiled worker ran (command line, speedup ratio, KV blocks): serve with the same
    worker: dict[str, Any] = field(default_factory=dict)
    #: the worker's KV cache in tokens (kv_blocks x block_size); None: unknown (an older profile), no KV cap
    kv_tokens: int | None = None
    #: the worker's KV block size: a stream's tokens are held in whole blocks
    block_size: int = 1

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ProfileError("a profile needs at least one prefill and one decode point")
        for p in self.prefill:
            if p.isl <= 0 or p.ttft_s <= 0:
                raise ProfileError(f"prefill point {p}: isl and ttft_s must be positive")
        for d in self.decode:
            if d.concurrency <= 0 or d.context <= 0 or d.itl_s <= 0 or d.tokens_per_s <= 0:
                raise ProfileError(f"decode point {d}: every field must be positive")
        if (self.kv_tokens is not None and self.kv_tokens <= 0) or self.block_size <= 0:
            raise ProfileError(f"kv_tokens ({self.kv_tokens}) and block_size ({self.block_size}) must be positive")
        self.prefill.sort(key=lambda p: p.isl)
        self.decode.sort(key=lambda d: (d.context, d.concurrency))

    # -- lookups ---------------------------------------------------------------------------
    def ttft_s(self, isl: float) -> float:
        """TTFT of a lone request of ``isl`` prompt tokens (interpolated, clamped to the measured range)."""
        return _interp([p.isl for p in self.prefill], [p.ttft_s for p in self.prefill], isl)

    def prefill_tokens_per_s(self, isl: float) -> float:
        """Prefill tokens/s one replica sustains at this ISL, back to back (isl / TTFT)."""
        return max(isl, 1.0) / self.ttft_s(max(isl, 1.0))

    def contexts(self) -> list[int]:
        return sorted({d.context for d in self.decode})

    def decode_curve(self, context: int) -> list[DecodePoint]:
        return [d for d in self.decode if d.context == context]

    def kv_streams(self, context: float) -> float:
        """Streams of ``context`` tokens the worker's KV cache holds at once (each in whole blocks: half a block
        more than its tokens on average); inf when the profile does not know the cache."""
        if self.kv_tokens is None:
            return math.inf
        return self.kv_tokens / (max(context, 1.0) + self.block_size / 2.0)

    def decode_capacity(self, context: float, itl_limit_s: float) -> tuple[float, float]:
        """(output tokens/s, ITL) of one replica at the highest measured concurrency whose ITL stays within
        ``itl_limit_s``, interpolated between the two measured contexts around ``context``, and capped at what
        the KV cache lets it run: ``kv_streams(context)`` streams at that ITL. (0, itl) when even one stream is
        too slow."""
        ctxs = self.contexts()
        lo = max([c for c in ctxs if c <= context], default=ctxs[0])
        hi = min([c for c in ctxs if c >= context], default=ctxs[-1])
        tl, il = self._best(lo, itl_limit_s)
        th, ih = self._best(hi, itl_limit_s)
        if hi == lo:
            tokens_per_s, itl = tl, il
        else:
            w = (context - lo) / (hi - lo)
            tokens_per_s, itl = tl + w * (th - tl), il + w * (ih - il)
        if tokens_per_s > 0:
            tokens_per_s = min(tokens_per_s, self.kv_streams(context) / itl)
        return tokens_per_s, itl

    def itl_s(self, context: float, concurrency: float) -> float:
        """ITL of one replica serving ``concurrency`` streams of ``context`` tokens (nearest measured context)."""
        ctxs = self.contexts()
        near = min(ctxs, key=lambda c: abs(c - context))
        curve = self.decode_curve(near)
        return _interp([d.concurrency for d in curve], [d.itl_s for d in curve], concurrency)

    def _best(self, context: int, itl_limit_s: float) -> tuple[float, float]:
        curve = self.decode_curve(context)
        ok = [d for d in curve if d.itl_s <= itl_limit_s]
        if not ok:
            return 0.0, min(d.itl_s for d in curve)
        best = max(ok, key=lambda d: d.tokens_per_s)
        return best.tokens_per_s, best.itl_s

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        kv = {} if self.kv_tokens is None else {"kv_tokens": self.kv_tokens, "block_size": self.block_size}
        return {
            "format": FORMAT,
            "engine": self.engine,
            "worker": self.worker,
            **kv,
            "prefill": [asdict(p) | {"tokens_per_s": p.tokens_per_s} for p in self.prefill],
            "decode": [asdict(d) for d in self.decode],
        }

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "profile") -> Profile:
        if d.get("format") != FORMAT:
            raise ProfileError(f"{where}: format is {d.get('format')!r}, expected {FORMAT!r}")
        try:
            prefill = [PrefillPoint(int(p["isl"]), float(p["ttft_s"])) for p in d["prefill"]]
            decode = [
                DecodePoint(int(p["concurrency"]), int(p["context"]), float(p["itl_s"]), float(p["tokens_per_s"]))
                for p in d["decode"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where}: bad or missing field ({e})") from None
        try:
            kv_tokens = None if d.get("kv_tokens") is None else int(d["kv_tokens"])
            block_size = int(d.get("block_size") or 1)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"{where}: bad kv_tokens or block_size ({e})") from None
        try:
            return cls(str(d.get("engine", "")), prefill, decode, dict(d.get("worker") or {}), kv_tokens, block_size)
        except ProfileError as e:
            raise ProfileError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"{path}: cannot read profile ({e})") from None
        if not isinstance(raw, dict):
            raise ProfileError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
