"""Fixtures over the STAND-IN of TensorRT-LLM 1.1's LLM API (standin/tensorrt_llm; see its docstring)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.engines.trtllm import TrtllmApi
from dynamo_grpc.engines.trtllm.config import TrtllmConfig
from dynamo_grpc.engines.trtllm.engine import TrtllmEngine
from dynamo_grpc.models.card import ModelCard
from tests.unit.trtllm.standin import tensorrt_llm as standin

VOCAB = 96
EOS = 1
STANDIN_DIR = Path(__file__).parent / "standin"


def write_checkpoint(root: Path) -> Path:
    """A HF-style dir the stand-in LLM and our model card both read: config.json + a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "vocab_size": VOCAB, "max_position_embeddings": 256, "eos_token_id": EOS}
    (root / "config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(models.WordLevel({f"t{k}": k for k in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1", "bos_token": "t0"}))
    return root


@pytest.fixture
def api() -> TrtllmApi:
    standin.STEP_SECONDS = 0.001
    return TrtllmApi.from_module(standin, standin.llmapi)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt")


MakeEngine = Callable[..., Awaitable[TrtllmEngine]]


@pytest.fixture
async def make_engine(api: TrtllmApi, checkpoint: Path) -> AsyncIterator[MakeEngine]:
    started: list[TrtllmEngine] = []

    async def make(**kw: Any) -> TrtllmEngine:
        kw.setdefault("block_size", 4)
        kw.setdefault("num_blocks", 64)
        kw.setdefault("poll_timeout_s", 0.5)
        card = ModelCard(name="tiny", context_length=256, tokenizer_sha256="", vocab_size=VOCAB, eos_token_ids=[EOS])
        eng = TrtllmEngine(TrtllmConfig(model=checkpoint, **kw), card, api)
        await eng.start()
        started.append(eng)
        return eng

    yield make
    for eng in started:
        await eng.stop()
