"""The engine benchmark's parts: llama.cpp's runner, accuracy and the machine limits."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dynamo_grpc.bench.engine_accuracy import agreement
from dynamo_grpc.bench.engine_limits import matmuls
from dynamo_grpc.bench.engine_llamacpp import BINARY, ENV, find_binary, run_batched

# One line of llama-batched-bench --output-format jsonl (llama.cpp tools/batched-bench), as it prints it.
ROW = {
    "n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1,
    "n_threads": 1, "n_threads_batch": 1, "pp": 100, "tg": 32, "pl": 8, "n_kv": 1056, "t_pp": 4.0,
    "speed_pp": 200.0, "t_tg": 2.0, "speed_tg": 128.0, "t": 6.0, "speed": 176.0,
}  # fmt: skip


def _stand_in(folder: Path, body: str) -> Path:
    """A faithful stand-in for the binary: same flags in, same jsonl out (llama.cpp is not built in CI)."""
    exe = folder / BINARY
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_llamacpp_rates_from_its_jsonl(tmp_path: Path) -> None:
    args = tmp_path / "args"
    exe = _stand_in(tmp_path, f'echo "$@" > {args}\necho "build: 1"\necho \'{json.dumps(ROW)}\'\n')
    r = run_batched(exe, Path("m.gguf"), 100, 32, 8, 1, 30)
    assert r["output_tokens"] == 256
    assert r["decode_tokens_per_s"] == pytest.approx(128.0) and r["tokens_per_s"] == pytest.approx(256 / 6.0)
    sent = args.read_text().split()
    for flag, value in (("-npp", "100"), ("-ntg", "32"), ("-npl", "8"), ("-t", "1"), ("-m", "m.gguf")):
        assert sent[sent.index(flag) + 1] == value


def test_llamacpp_failure_is_an_error_with_its_message(tmp_path: Path) -> None:
    exe = _stand_in(tmp_path, 'echo "error: failed to load model" >&2\nexit 1\n')
    with pytest.raises(RuntimeError, match="failed to load model"):
        run_batched(exe, Path("m.gguf"), 10, 4, 1, 1, 30)


def test_llamacpp_binary_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path, why = find_binary(None)
    assert path is None and "skipped" in why and ENV in why
    path, why = find_binary(str(tmp_path))  # a folder without the binary
    assert path is None and "not an executable" in why
    exe = _stand_in(tmp_path, "exit 0\n")
    assert find_binary(str(tmp_path)) == (exe, "")  # the build/bin folder
    monkeypatch.setenv(ENV, str(exe))
    assert find_binary(None) == (exe, "")


def test_agreement_counts_tokens_up_to_the_first_divergence() -> None:
    ref = [[1, 2, 3, 4], [5, 6], [7]]
    got = [[1, 2, 9, 4], [5, 6], [8]]
    a = agreement(ref, got)
    assert a["identical_requests"] == "1/3"
    assert a["token_agreement"] == pytest.approx((2 + 2 + 0) / 7)


def test_matmul_limits_cover_every_format() -> None:
    from dynamo_grpc.engines.torch.exact_gemv import kernels

    rows = matmuls({"tiny": (64, 64)}, rows=(1, 16), reps=1)
    # fp32-blocks: the default fp32 path's block kernels (few-row kernel at 1 row, block GEMM at 16)
    formats = ("fp32", "bf16", "int8", "int4") + (("fp32-blocks",) if kernels() is not None else ())
    assert {(r["format"], r["rows"]) for r in rows} == {(f, m) for f in formats for m in (1, 16)}
    assert all(r["gflop_s"] > 0 and r["weight_gb_s"] > 0 for r in rows)


def test_decode_perplexity_feeds_the_text_through_the_decode_path(tmp_path: Path) -> None:
    """Same model, same text: one prefill and token-by-token decodes give the same perplexity (fp32)."""
    from dynamo_grpc.bench.engine_accuracy import decode_perplexity, perplexity
    from dynamo_grpc.engines.torch import TorchEngine
    from tests.helpers.tiny_llama import make_tiny_model

    eng = TorchEngine(make_tiny_model(tmp_path), block_size=4, num_blocks=16, num_threads=1)
    ids = [2 + (7 * k) % 90 for k in range(30)]  # across several blocks
    a, b = perplexity(eng, ids), decode_perplexity(eng, ids)
    assert a > 1 and abs(a - b) < 1e-4 * a
