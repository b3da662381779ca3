"""The mocker engine: the engine core with the mocker's executor, stepped inside the event loop.

No model runs. Each step is scheduled by the one core, "executed" by :class:`MockerRunner`
(hash-sampled tokens, the timing model's step time), and paced against a simulated clock rather
than slept per step, so at a high speedup_ratio (steps of microseconds) the loop runs many steps
per sleep yet keeps the simulated rate, and still yields to the event loop every step.
"""

from __future__ import annotations

from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.engine_core import CoreStats, EngineCore

from .config import MockerConfig
from .runner import MockerRunner


class MockerEngine(CoreEngine):
    """An Engine with the behaviour and timing of a vLLM-like engine, and real KV events."""

    def __init__(self, config: MockerConfig | None = None) -> None:
        self.config = config or MockerConfig()
        self.config.validate()
        self.runner = MockerRunner(self.config)
        super().__init__(EngineCore(self.config.core_config(), self.runner), threaded=False)

    @property
    def stats(self) -> CoreStats:
        return self.core.stats
