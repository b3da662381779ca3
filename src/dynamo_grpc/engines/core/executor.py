"""The executor interface: what the engine core needs from a model runner (torch) or a simulator (mocker)."""

from __future__ import annotations

from typing import Protocol

from .output import ExecutorOutput, SchedulerOutput


class Executor(Protocol):
    """Runs one step's plan. Never sees the scheduler, the KV manager or a live request."""

    #: SamplingParams fields this executor cannot honour when set (refused with UnsupportedOption)
    unsupported_options: frozenset[str]
    #: whether it serves LoRA adapters (requests naming one are refused with FailedPrecondition if not)
    supports_lora: bool
    #: why, in words, for the refusals above (e.g. "is not supported by the mocker engine")
    refusal: str

    def execute(self, plan: SchedulerOutput) -> ExecutorOutput:
        """Feed the plan's chunks, sample where a chunk ``samples``, forget ``finished_ids``."""
        ...
