"""Trace loaders, token expansion and the infinite-cache bound of the replay benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynamo_grpc.bench.replay_bound import bound_from_prompts, infinite_cache_bound
from dynamo_grpc.bench.replay_tokens import hash_block_tokens, prompt_tokens
from dynamo_grpc.bench.replay_trace import Trace, TraceError, TraceRequest, detect_format, load_trace
from dynamo_grpc.tokens.block_hash import block_hash_list

# the public traces live in shared/ beside the repository (DESIGN.md, "Testing and benchmarks")
TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
CONV = TRACES / "mooncake_fast25_conversation_trace.jsonl"


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_mooncake_loader_orders_and_rebases(tmp_path: Path) -> None:
    p = _write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"timestamp": 3000, "input_length": 600, "output_length": 5, "hash_ids": [0, 2]},
            {"timestamp": 1000, "input_length": 512, "output_length": 7, "hash_ids": [0]},
            {"timestamp": 3000, "input_length": 10, "output_length": 1, "hash_ids": [9]},
        ],
    )
    tr = load_trace(p)
    assert tr.fmt == "mooncake" and tr.hash_block_size == 512
    assert [r.arrival_s for r in tr.requests] == [0.0, 2.0, 2.0]
    assert [r.input_length for r in tr.requests] == [512, 600, 10]  # stable for equal timestamps
    assert [r.index for r in tr.requests] == [0, 1, 2]
    assert tr.requests[1].hash_ids == (0, 2)
    assert tr.duration_s == 2.0
    assert len(load_trace(p, limit=2).requests) == 2


@pytest.mark.parametrize(
    ("row", "msg"),
    [
        ({"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0]}, "expected ceil"),
        ({"timestamp": 0, "output_length": 5, "hash_ids": [0]}, "missing field 'input_length'"),
        ({"timestamp": 0, "input_length": 0, "output_length": 5, "hash_ids": []}, "must be positive"),
        ({"timestamp": 0, "input_length": 5, "output_length": 5, "hash_ids": [-1]}, "non-negative"),
    ],
)
def test_mooncake_loader_rejects_bad_rows(tmp_path: Path, row: dict[str, object], msg: str) -> None:
    p = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(TraceError, match=msg) as ei:
        load_trace(p)
    assert "bad.jsonl:1" in str(ei.value)


def test_not_json_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"timestamp": 0,\n')
    with pytest.raises(TraceError, match=r"x\.jsonl:1: not JSON"):
        load_trace(p)


def test_azure_loader_parses_wall_clock_with_7_digit_fraction(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
    )
    assert detect_format(p) == "azure"
    tr = load_trace(p)
    assert tr.fmt == "azure" and tr.hash_block_size is None
    assert tr.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-5)
    assert tr.requests[0].hash_ids is None and tr.requests[1].output_length == 109


def test_azure_loader_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("TIMESTAMP,ContextTokens\n1,2\n")
    with pytest.raises(TraceError, match="missing column 'GeneratedTokens'"):
        load_trace(p)


def test_unknown_format_and_bad_limit(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 1, "output_length": 1}])
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(p, fmt="parquet")
    with pytest.raises(ValueError, match="limit"):
        load_trace(p, limit=0)


def test_block_tokens_are_deterministic_valid_and_distinct() -> None:
    a = hash_block_tokens([5, 6], 512)
    assert a.shape == (2, 512) and a.dtype == np.int32
    assert np.array_equal(a, hash_block_tokens([5, 6], 512))
    assert a.min() >= 32 and a.max() < 49152
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, hash_block_tokens([5, 6], 512, salt=1))
    # roughly uniform over the vocabulary
    many = hash_block_tokens(list(range(200)), 512).reshape(-1)
    assert len(np.unique(many)) > 40_000


def test_equal_hash_ids_give_equal_block_hashes_partial_tail_is_prefix() -> None:
    r1 = TraceRequest(0, 0.0, 1024, 1, (0, 1))
    r2 = TraceRequest(1, 0.0, 1000, 1, (0, 2))
    r3 = TraceRequest(2, 0.0, 700, 1, (0, 1))
    t1, t2, t3 = (prompt_tokens(r, 512) for r in (r1, r2, r3))
    assert len(t1) == 1024 and len(t2) == 1000 and len(t3) == 700
    h1, h2, h3 = (block_hash_list(t, 64) for t in (t1, t2, t3))
    assert h1[:8] == h2[:8] and h1[8] != h2[8]
    assert h3 == h1[: len(h3)]  # the partial tail of block 1 is a prefix of the full block


def test_random_prompts_without_hash_ids() -> None:
    r = TraceRequest(3, 0.0, 300, 1, None)
    t = prompt_tokens(r, None)
    assert len(t) == 300 and np.array_equal(t, prompt_tokens(r, None))
    assert not np.array_equal(t[:64], prompt_tokens(TraceRequest(4, 0.0, 300, 1, None), None)[:64])
    with pytest.raises(ValueError):
        prompt_tokens(TraceRequest(0, 0.0, 10, 1, (1,)), None)


def test_bound_small_trace_by_hand() -> None:
    reqs = (
        TraceRequest(0, 0.0, 1024, 1, (0, 1)),
        TraceRequest(1, 1.0, 1000, 1, (0, 2)),  # block 0 hits
        TraceRequest(2, 2.0, 700, 1, (0, 1)),  # both hit
    )
    b = infinite_cache_bound(Trace("t", "mooncake", reqs, 512), engine_block_size=64)
    assert b.block_refs == 6 and b.unique_blocks == 3
    assert b.block_weighted == pytest.approx(3 / 6)
    assert b.token_weighted == pytest.approx((512 + 512 + 188) / 2724)
    # engine level: r1 hits 8 blocks (512); r2 hits 8 + 2 full blocks of (0,1)'s tail = 640 tokens
    assert b.engine_token_weighted == pytest.approx((512 + 640) / 2724)


def test_bound_agrees_with_real_block_hashing() -> None:
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(60):
        n = int(rng.integers(1, 6))
        ids = [0] + [int(x) for x in rng.integers(1, 12, size=n - 1)]
        # make ids prefix hashes: id depends on the whole prefix
        prefix_ids = [hash(tuple(ids[: k + 1])) & 0xFFFF for k in range(n)]
        length = 512 * (n - 1) + int(rng.integers(1, 513))
        reqs.append(TraceRequest(i, float(i), length, 1, tuple(prefix_ids)))
    tr = Trace("t", "mooncake", tuple(reqs), 512)
    for bs in (64, 48):
        expect = bound_from_prompts((prompt_tokens(r, 512) for r in reqs), bs)
        assert infinite_cache_bound(tr, bs).engine_token_weighted == pytest.approx(expect)
        assert expect > 0.1


def test_bound_without_prefix_info_is_zero() -> None:
    tr = Trace("a", "azure", (TraceRequest(0, 0.0, 10, 1, None),), None)
    assert infinite_cache_bound(tr).engine_token_weighted == 0.0


@pytest.mark.skipif(not CONV.exists(), reason="public traces not on this machine")
def test_conversation_trace_reproduces_readme_bound() -> None:
    tr = load_trace(CONV)
    assert len(tr.requests) == 12031
    b = infinite_cache_bound(tr)
    assert (b.block_refs, b.unique_blocks) == (288_500, 182_790)
    assert round(100 * b.block_weighted, 2) == 36.64
    assert round(100 * b.token_weighted, 1) == 37.4


def test_capped_truncates_prompts_and_keeps_prefix_ids() -> None:
    from dynamo_grpc.bench.replay import capped

    reqs = (TraceRequest(0, 0.0, 1500, 900, (0, 1, 2)), TraceRequest(1, 1.0, 300, 5, (0,)))
    tr = capped(Trace("t", "mooncake", reqs, 512), max_input=1024, max_output=100)
    assert [(r.input_length, r.output_length, r.hash_ids) for r in tr.requests] == [
        (1024, 100, (0, 1)),
        (300, 5, (0,)),
    ]
    assert capped(tr, None, None) is tr


def test_needed_context_and_long_context_model_dir(tmp_path: Path) -> None:
    from dynamo_grpc.bench.replay import ReplayConfig, model_dir, needed_context
    from dynamo_grpc.models.card import ModelSourceError, load_model_source

    short = Trace("t", "mooncake", (TraceRequest(0, 0.0, 1000, 10, (0, 1)),), 512)
    long = Trace("t", "mooncake", (TraceRequest(0, 0.0, 20_000, 500, tuple(range(40))),), 512)
    assert needed_context(short) == 1024 and needed_context(long) == 21504
    assert model_dir(ReplayConfig("t", ["kv"]), short, tmp_path) is None
    try:
        d = model_dir(ReplayConfig("t", ["kv"]), long, tmp_path)
    except ModelSourceError as e:  # the default model wheel is not installed here
        pytest.skip(str(e))
    assert d is not None
    card, tok = load_model_source(d)
    assert card.context_length == 21504 and card.vocab_size == 49152 and tok
    assert card.name == "SmolLM2-135M-Instruct-ctx21504" and card.chat_template
