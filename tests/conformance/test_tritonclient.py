"""Triton's own Python clients (sync, async_infer, decoupled streams, asyncio) against the real mesh."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from dynamo_grpc.launch.mesh import Mesh
from tests.conformance.conftest import CLIENTS, MODEL, run_client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] not installed"),
]


def test_tritonclient_grpc_sync_async_and_stream(mesh: Mesh) -> None:
    obs = run_client("tritonclient_grpc_client.py", mesh.frontend_grpc, MODEL)
    assert obs["live"] and obs["ready"] and obs["model_ready"]
    assert obs["server_metadata"]["name"] == "dynamo-grpc"
    assert {m["name"]: m["state"] for m in obs["index"]["models"]}[MODEL] == "READY"
    cfg = obs["model_config"]["config"]
    assert cfg["model_transaction_policy"]["decoupled"] is True
    assert {"context_length", "block_size"} <= set(cfg["parameters"])
    assert int(cfg["parameters"]["block_size"]["string_value"]) == 64
    names = {t["name"] for t in obs["model_metadata"]["inputs"]}
    assert {"text_input", "stream", "sampling_parameters", "exclude_input_in_output", "max_tokens"} <= names
    assert {t["name"] for t in obs["model_metadata"]["outputs"]} >= {"text_output", "finish_reason"}

    infer = obs["infer"]
    assert infer["id"] == "u1" and infer["finish_reason"] == "length"
    assert infer["num_output_tokens"] == 12 and infer["num_input_tokens"] > 0 and infer["text"]
    assert obs["requested_outputs"] == ["finish_reason"]
    # The chat template wraps the prompt in role markup: more prompt tokens than the plain prompt.
    assert obs["chat"]["num_input_tokens"] > infer["num_input_tokens"] + 4
    assert obs["chat"]["num_output_tokens"] == 12 and obs["chat"]["text"]
    # Same seed, same prompt: every path yields the same text.
    assert obs["async_infer"] == {"error": None, "text": infer["text"]}
    stream = obs["stream"]
    assert "".join(stream["chunks"]) == infer["text"]
    assert len(stream["chunks"]) >= 2 and stream["finals"] == [False] * (len(stream["finals"]) - 1) + [True]
    assert stream["ids"] == ["s1"] and obs["stream_finish_reason"] == "length"
    assert obs["stream_false"] == {"error": None, "final": True, "text": infer["text"]}
    assert "max_tokens" in obs["stream_error"] and "INVALID_ARGUMENT" in obs["stream_error"]
    assert obs["stream_after_error"] == infer["text"]
    assert obs["errors"]["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert obs["errors"]["bad_json"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "sampling_parameters" in obs["errors"]["bad_json"]["message"]
    assert obs["concurrent"] == [infer["text"]] * 8
    (st,) = obs["statistics"]["model_stats"]
    assert int(st["inference_count"]) >= 6
    success = st["inference_stats"]["success"]
    assert int(success["count"]) >= 6 and int(success["ns"]) > 0
    assert int(st["inference_stats"]["fail"]["count"]) >= 1


def test_tritonclient_grpc_aio(mesh: Mesh) -> None:
    obs = run_client("tritonclient_aio_client.py", mesh.frontend_grpc, MODEL)
    assert obs["live"] and obs["model_ready"]
    assert obs["stream_errors"] == []
    assert obs["finals"] == {"r1": 1, "r2": 1, "r3": 1}
    assert obs["streamed"] == {f"r{s}": obs["unary"][str(s)] for s in (1, 2, 3)}
    assert len(set(obs["unary"].values())) == 3  # different seeds, different text
    assert obs["unknown_model"] == "StatusCode.NOT_FOUND"


def test_triton_simple_example_script(mesh: Mesh) -> None:
    """The `simple` model answers Triton's example client (a faithful re-implementation; see the script)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(CLIENTS / "simple_grpc_infer_client.py"), "-u", mesh.frontend_grpc],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS: infer" in proc.stdout and "0 + 1 = 1" in proc.stdout and "15 - 1 = 14" in proc.stdout
