"""The engine core's scheduling flags, defined once for every engine that runs on it (mocker, torch).

``--schedule-policy fcfs|lpm`` orders the engine's waiting queue (``admission.py``); ``--schedule-age-cap-secs``
bounds how long lpm may pass a request over. TensorRT-LLM schedules itself: both are refused there. Every
flag also reads DYN_<FLAG> (envflags).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .admission import POLICIES
from .scheduler import SchedulerConfig


@dataclass(frozen=True)
class SchedulePolicy:
    policy: str = "fcfs"
    age_cap_s: float = SchedulerConfig.age_cap_s


def add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine scheduling (mocker and torch)")
    g.add_argument(
        "--schedule-policy",
        choices=POLICIES,
        default="fcfs",
        help="order of the engine's waiting queue: fcfs (arrival, vLLM's) or lpm (longest cached prefix first, "
        "SGLang's; host/disk hits count 0.75/0.25 a block; arrival order above 128 waiting); docs/kvbm.md",
    )
    g.add_argument(
        "--schedule-age-cap-secs",
        type=float,
        default=None,
        help=f"lpm: a request that has waited this long goes first, oldest first, whatever is cached "
        f"(default {SchedulerConfig.age_cap_s:g}; 0: no cap, cold prompts can starve)",
    )


def schedule_policy_from_args(args: argparse.Namespace) -> SchedulePolicy:
    """The flags' policy; ValueError naming the flag when it cannot be honoured."""
    policy = args.schedule_policy
    cap = args.schedule_age_cap_secs
    if cap is not None and policy != "lpm":
        raise ValueError(f"--schedule-age-cap-secs {cap:g}: only read with --schedule-policy lpm (got {policy})")
    if cap is not None and cap < 0:
        raise ValueError(f"--schedule-age-cap-secs must be >= 0, got {cap:g}")
    engine = getattr(args, "engine", "mocker")
    if engine == "trtllm" and policy != "fcfs":
        raise ValueError(f"--schedule-policy {policy}: not supported with --engine trtllm (it schedules itself)")
    return SchedulePolicy(policy, SchedulerConfig.age_cap_s if cap is None else cap)
