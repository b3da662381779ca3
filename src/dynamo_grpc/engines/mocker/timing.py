"""How long a simulated engine step takes (Dynamo's mocker model, fitted on a real GPU engine).

prefill ms = 1.25e-6·t² + 7.41e-2·t + 26.2 for t new (uncached) tokens in the step;
decode ms  = −5.47·p² + 43.88·p + 19.44 with p the fraction of KV blocks in use.
A step that both prefills and decodes costs the sum (one forward pass does both, but chunked
prefill stretches the step); everything is divided by ``speedup_ratio``.
"""

from __future__ import annotations

from dataclasses import dataclass


def prefill_ms(new_tokens: int) -> float:
    """Milliseconds to prefill ``new_tokens`` uncached tokens (0 for none)."""
    if new_tokens <= 0:
        return 0.0
    t = float(new_tokens)
    return 1.25e-6 * t * t + 7.41e-2 * t + 26.2


def decode_ms(active_fraction: float) -> float:
    """Milliseconds for one decode step with ``active_fraction`` of the KV cache in use."""
    p = min(max(active_fraction, 0.0), 1.0)
    return -5.47 * p * p + 43.88 * p + 19.44


@dataclass(frozen=True)
class TimingModel:
    speedup_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.speedup_ratio <= 0:
            raise ValueError(f"speedup_ratio must be positive, got {self.speedup_ratio}")

    def step_seconds(self, prefill_tokens: int, num_decodes: int, active_fraction: float) -> float:
        """Wall time of one step that prefills ``prefill_tokens`` and decodes ``num_decodes`` sequences."""
        ms = prefill_ms(prefill_tokens)
        if num_decodes > 0:
            ms += decode_ms(active_fraction)
        return ms / self.speedup_ratio / 1000.0
