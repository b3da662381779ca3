"""Observed/expected latency corrections, learnt as a request-weighted mean shrunk toward the profile.

Each interval gives a ratio ``x`` (observed latency / what the profile expected) from ``n`` finished requests.
The correction is the weighted mean of the profile's own word (``c = 1``, worth ``PRIOR_REQUESTS`` requests) and
every ratio seen, each worth its requests:

    c ← (w·c + n·x) / (w + n),   w ← min(w + n, MEMORY_REQUESTS)

so an interval of 7 requests at the base rate moves the correction by 7/37 of its ratio's excess, not half of it
(the ``½c + ½x`` rule this replaces let one such interval set ``c_p`` to 1.31, and that, applied at four times the
load, sized the bench's peak for 5 workers where 4 meet it). The cap on ``w`` keeps it adapting: once
``MEMORY_REQUESTS`` requests have been seen, each new interval still moves it by ``n / (MEMORY_REQUESTS + n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

CORRECTION_RANGE = (0.5, 2.0)
#: the profile counts as this many requests' worth of evidence that the correction is 1
PRIOR_REQUESTS = 30.0
#: evidence is capped at this many requests, so a profile that drifts is followed
MEMORY_REQUESTS = 300.0


def clamp(x: float) -> float:
    lo, hi = CORRECTION_RANGE
    return max(lo, min(hi, x))


@dataclass(slots=True)
class Correction:
    value: float = 1.0
    weight: float = PRIOR_REQUESTS

    def learn(self, ratio: float, requests: float) -> float:
        """Fold in one interval's ``ratio`` (clamped to ``CORRECTION_RANGE``) from ``requests`` finished requests."""
        if requests <= 0:
            return self.value
        x = clamp(ratio)
        self.value = (self.weight * self.value + requests * x) / (self.weight + requests)
        self.weight = min(self.weight + requests, MEMORY_REQUESTS)
        return self.value
