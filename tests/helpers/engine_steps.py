"""Drive an engine core step by step with the torch executor, to read a prompt's last-token logits."""

from __future__ import annotations

import torch

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.core import CoreConfig, EngineCore, ExecutorOutput, SchedulerConfig
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.model import LlamaModel
from dynamo_grpc.engines.torch.runner import ModelRunner


def torch_core(model: LlamaModel, num_blocks: int, block_size: int, budget: int) -> tuple[EngineCore, ModelRunner]:
    runner = ModelRunner(model, KvCache(model.cfg, num_blocks, block_size, torch.float32))
    cfg = CoreConfig(
        block_size=block_size,
        num_blocks=num_blocks,
        context_length=1 << 20,
        vocab_size=model.cfg.vocab_size,
        scheduler=SchedulerConfig(4, budget),
    )
    return EngineCore(cfg, runner), runner


def last_logits(core: EngineCore, runner: ModelRunner, ids: list[int], rid: str) -> tuple[torch.Tensor, int]:
    """Logits after the last prompt token (chunked prefill over any cached prefix), and the cached tokens."""
    req = core.make_request(EngineRequest(rid, ids, SamplingParams(max_tokens=1)))
    core.add(req)
    while True:
        plan = core.scheduler.schedule()
        runner.prepare(plan)
        chunks, logits = runner.forward(plan)
        sampled = {c.request_id: int(logits[i].argmax()) for i, c in enumerate(chunks)}
        core.scheduler.update(plan, ExecutorOutput(sampled))
        if chunks:
            return logits[0], req.num_cached_tokens
