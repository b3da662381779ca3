"""Engine cores over each executor, and engines behind the Engine interface, for the shared suites.

``make_core`` builds an :class:`EngineCore` whose executor is the mocker's simulator or the torch
model runner (a tiny random Llama), so one scheduler suite checks that both behave the same under
the same plans. ``engine_factory`` yields a factory of started :class:`Engine` objects for the
conformance suite; the TensorRT-LLM adapter joins over a stand-in of its LLM API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.engines.base import Engine
from dynamo_grpc.engines.core import CoreConfig, EngineCore, Executor, SchedulerConfig
from dynamo_grpc.engines.mocker import MockerConfig, MockerEngine
from dynamo_grpc.engines.mocker.runner import MockerRunner

#: the tiny Llama's vocabulary (tests/helpers/tiny_llama.py); the mocker uses the same
VOCAB = 96
EOS = 1


#: make_core(num_blocks=16, max_seqs=8, budget=64, *, block_size=4, watermark=0.0, context_length=1 << 20, eos=...)
MakeCore = Callable[..., EngineCore]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from tests.helpers.tiny_llama import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path) -> Any:
    from dynamo_grpc.engines.torch.model import LlamaModel
    from dynamo_grpc.engines.torch.weights import load_checkpoint

    return LlamaModel(load_checkpoint(tiny_llama_dir))


def _executor(kind: str, request: pytest.FixtureRequest, num_blocks: int, block_size: int) -> Executor:
    if kind == "mocker":
        return MockerRunner(MockerConfig(vocab_size=VOCAB, block_size=block_size, num_gpu_blocks=num_blocks))
    import torch

    from dynamo_grpc.engines.torch.kv_cache import KvCache
    from dynamo_grpc.engines.torch.runner import ModelRunner

    torch.set_num_threads(1)
    model = request.getfixturevalue("tiny_llama")
    return ModelRunner(model, KvCache(model.cfg, num_blocks, block_size, torch.float32))


@pytest.fixture(params=["mocker", "torch"])
def make_core(request: pytest.FixtureRequest) -> MakeCore:
    kind = request.param

    def make(
        num_blocks: int = 16,
        max_seqs: int = 8,
        budget: int = 64,
        *,
        block_size: int = 4,
        watermark: float = 0.0,
        context_length: int = 1 << 20,
        eos: frozenset[int] = frozenset(),
    ) -> EngineCore:
        cfg = CoreConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            context_length=context_length,
            vocab_size=VOCAB,
            eos_token_ids=eos,
            scheduler=SchedulerConfig(max_seqs, budget, watermark),
        )
        return EngineCore(cfg, _executor(kind, request, num_blocks, block_size))

    return make


EngineFactory = Callable[..., Awaitable[Engine]]


def _trtllm_engine(
    model_dir: Path, num_blocks: int, block_size: int, max_waiting: int, max_num_seqs: int, realtime: bool
) -> Engine:
    """The TensorRT-LLM adapter over the stand-in of its LLM API (tests/unit/trtllm/standin: TRT-LLM 1.1's shapes)."""
    from dynamo_grpc.engines.trtllm import TrtllmApi
    from dynamo_grpc.engines.trtllm.config import TrtllmConfig
    from dynamo_grpc.engines.trtllm.engine import TrtllmEngine
    from dynamo_grpc.models.card import ModelCard
    from tests.unit.trtllm.standin import tensorrt_llm as standin

    standin.STEP_SECONDS = 0.02 if realtime else 0.001
    card = ModelCard(name="tiny", context_length=256, tokenizer_sha256="", vocab_size=VOCAB, eos_token_ids=[EOS])
    cfg = TrtllmConfig(
        model=model_dir, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=32, max_waiting=max_waiting, poll_timeout_s=0.5,
    )  # fmt: skip
    return TrtllmEngine(cfg, card, TrtllmApi.from_module(standin, standin.llmapi))


@pytest.fixture(params=["mocker", "torch", "trtllm"])
async def engine_factory(request: pytest.FixtureRequest) -> AsyncIterator[EngineFactory]:
    """Started engines with a given geometry (``num_blocks``, ``block_size``, ``max_waiting``, ``max_num_seqs``).

    Every engine has the tiny vocabulary (VOCAB, EOS id 1) and a context of 256 tokens. ``realtime``
    asks for steps that take real time (the mocker at speedup 1, ~20 ms a step), for tests that need
    a request to stay running while they look.
    """
    started: list[Engine] = []
    kind = request.param

    async def factory(
        num_blocks: int = 64,
        block_size: int = 4,
        max_waiting: int = 4096,
        max_num_seqs: int = 8,
        realtime: bool = False,
    ) -> Engine:
        eng: Engine
        if kind == "trtllm":
            model_dir = request.getfixturevalue("tmp_path")
            (model_dir / "config.json").write_text(f'{{"vocab_size": {VOCAB}, "max_position_embeddings": 256}}')
            eng = _trtllm_engine(model_dir, num_blocks, block_size, max_waiting, max_num_seqs, realtime)
        elif kind == "mocker":
            eng = MockerEngine(
                MockerConfig(
                    vocab_size=VOCAB, eos_token_ids=[EOS], block_size=block_size, num_gpu_blocks=num_blocks,
                    max_waiting=max_waiting, max_num_seqs=max_num_seqs, max_num_batched_tokens=32,
                    context_length=256, speedup_ratio=1.0 if realtime else 1000.0, watermark=0.0,
                )
            )  # fmt: skip
        else:
            from dynamo_grpc.engines.torch import TorchEngine

            eng = TorchEngine(
                request.getfixturevalue("tiny_llama_dir"), block_size=block_size, num_blocks=num_blocks,
                max_waiting=max_waiting, max_num_seqs=max_num_seqs, max_num_batched_tokens=32, num_threads=1,
                watermark=0.0,
            )  # fmt: skip
        await eng.start()
        started.append(eng)
        return eng

    yield factory
    for eng in started:
        await eng.stop()
