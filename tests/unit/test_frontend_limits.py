"""Frontend limit flags and API keys: parsing, validation, the bearer check, client id bounds."""

from __future__ import annotations

import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.limits import MAX_CLIENT_ID_BYTES, Limits, check_client_id
from dynamo_grpc.frontend.main import build_parser, main


def limits(argv: list[str]) -> Limits:
    return Limits.from_args(build_parser().parse_args(argv))


def test_defaults_are_bounded() -> None:
    d = limits([])
    assert d.max_message_bytes == 16 << 20 and d.max_input_bytes == 1 << 20
    assert d.max_stream_requests == 64 and d.api_keys == ()
    assert d.authorized(None)  # no keys configured: open


def test_api_keys_from_flags_file_and_env(tmp_path, monkeypatch) -> None:
    f = tmp_path / "keys"
    f.write_text("# ops keys\nk-file\n\n")
    monkeypatch.setenv("DYN_API_KEYS", "k-env1,k-env2")
    assert set(limits([]).api_keys) == {"k-env1", "k-env2"}  # DYN_API_KEYS is --api-key's default (envflags)
    # as for every flag, --api-key given replaces the environment's keys; a key file adds to them
    lim = limits(["--api-key", "k1", "--api-key", "k2", "--api-key-file", str(f)])
    assert set(lim.api_keys) == {"k1", "k2", "k-file"}
    assert lim.authorized("Bearer k-file") and lim.authorized("bearer k2")
    for bad in (None, "", "k1", "Bearer", "Bearer k", "Bearer k1x", "Basic k1"):
        assert not lim.authorized(bad), bad


def test_metrics_key_is_separate() -> None:
    lim = limits(["--api-key", "a", "--metrics-api-key", "m"])
    assert lim.metrics_authorized("Bearer m") and not lim.metrics_authorized("Bearer a")
    assert limits([]).metrics_authorized(None)


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--max-message-bytes", "0"], "--max-message-bytes must be >= 1"),
        (["--max-inflight-requests", "0"], "--max-inflight-requests must be >= 1"),
        (["--max-queued-requests", "-1"], "--max-queued-requests must be >= 0"),
        (["--http-body-timeout", "0"], "--http-body-timeout"),
        (["--api-key-file", "/nonexistent/keys"], "No such file"),
    ],
)
def test_bad_limit_flags_exit_with_one_line(argv: list[str], msg: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--grpc-port", "0", *argv])
    assert msg in str(e.value)


def test_client_ids_are_bounded() -> None:
    check_client_id("id", "x" * MAX_CLIENT_ID_BYTES)
    check_client_id("id", "é" * (MAX_CLIENT_ID_BYTES // 2))
    with pytest.raises(errors.InvalidArgument, match="'id' is 257 bytes, at most 256"):
        check_client_id("id", "x" * (MAX_CLIENT_ID_BYTES + 1))
    with pytest.raises(errors.InvalidArgument, match="'user' is 258 bytes"):
        check_client_id("user", "é" * 129)
