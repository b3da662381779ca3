"""The one engine core every in-process executor runs behind (vLLM v1's split of core and runner).

- ``request.py``: a request's state, its block-hash chain and the stop rules;
- ``block_pool.py``: the KV blocks, free queue (LRU), prefix-cache map and KV events;
- ``kv_manager.py``: what blocks a request holds (prefix lookup, allocate, register, free);
- ``scheduler.py``: admission, chunked prefill, preemption, the watermark; emits a plain plan;
- ``admission.py``: the waiting queue's order (fcfs, or lpm: longest cached prefix first, age-capped);
- ``flags.py``: ``--schedule-policy`` / ``--schedule-age-cap-secs``, defined once for every engine;
- ``output.py``: the plan (``SchedulerOutput``) and the executor's answer (``ExecutorOutput``);
- ``executor.py``: the interface the mocker's simulator and the torch model runner implement;
- ``engine_core.py``: one step = schedule → execute → update, events taken once, request checks;
- ``driver.py``: ``CoreEngine``, the asyncio ``Engine`` over a core (inline or on a thread).
"""

from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.engine_core import CoreConfig, EngineCore
from dynamo_grpc.engines.core.executor import Executor
from dynamo_grpc.engines.core.output import ExecutorOutput, NewRequest, ScheduledChunk, SchedulerOutput
from dynamo_grpc.engines.core.scheduler import SchedulerConfig

__all__ = [
    "CoreConfig",
    "CoreEngine",
    "EngineCore",
    "Executor",
    "ExecutorOutput",
    "NewRequest",
    "ScheduledChunk",
    "SchedulerConfig",
    "SchedulerOutput",
]
