"""Disaggregation roles and phases: which workers serve which phase of a request (one rule, every router).

A worker registers ``dynamo-worker`` with tag ``role=prefill|decode|both`` (``--role``; Meta ``role`` too).
A route names the phase it is for (``RouteRequest.phase``): prefill goes to ``role=prefill`` workers,
decode to ``role=decode``, aggregated to ``role=both``. When a pool is empty the phase falls back to the
workers that can still do the work — ``both`` workers do every phase, and decode workers prefill locally
— so a mesh of only decode workers (or only ``both``) still serves every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROLES = ("prefill", "decode", "both")
PHASES = ("aggregated", "prefill", "decode")
DEFAULT_ROLE = "both"

#: phase -> roles that serve it, in order of preference (the first present pool wins)
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "prefill": ("prefill", "both"),
    "decode": ("decode", "both"),
    "aggregated": ("both", "decode"),
}


def role_of(tags: Iterable[str] | None, meta: Mapping[str, str] | None = None) -> str:
    """A registration's role: tag ``role=<role>`` (Meta ``role`` as a fallback); ``both`` when absent or unknown."""
    for t in tags or ():
        if t.startswith("role="):
            role = t[5:]
            if role in ROLES:
                return role
    role = (meta or {}).get("role", "")
    return role if role in ROLES else DEFAULT_ROLE


def roles_for(phase: str, present: Iterable[str]) -> frozenset[str]:
    """The roles a route for ``phase`` may pick among, given the roles of the live workers."""
    if phase not in _PREFERENCE:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    have = set(present)
    for role in _PREFERENCE[phase]:
        if role in have:
            return frozenset({role})
    return frozenset()
