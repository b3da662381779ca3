"""The worker's tier flags: MiB to bytes, DYN_* variables, and refusals that name the flag."""

from __future__ import annotations

import pytest

from dynamo_grpc.kvbm.flags import kvbm_config_from_args
from dynamo_grpc.worker.main import build_parser


def _cfg(argv: list[str]):  # type: ignore[no-untyped-def]
    return kvbm_config_from_args(build_parser().parse_args(argv))


def test_flags_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    cfg = _cfg(["--kv-host-mib", "8", "--kv-disk-dir", "/tmp/g3", "--kv-disk-mib", "16"])
    assert cfg.host_bytes == 8 << 20 and cfg.disk_dir == "/tmp/g3" and cfg.disk_bytes == 16 << 20
    monkeypatch.setenv("DYN_KV_HOST_MIB", "4")
    monkeypatch.setenv("DYN_KV_HOST_GBPS", "12.5")
    cfg = _cfg([])
    assert cfg.host_bytes == 4 << 20 and cfg.host_gbps == 12.5


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--kv-disk-mib", "16"], "--kv-disk-mib"),
        (["--kv-disk-dir", "/tmp/x"], "--kv-disk-dir"),
        (["--kv-host-mib", "-1"], "--kv-host-mib"),
        (["--engine", "trtllm", "--kv-host-mib", "8"], "--kv-host-mib"),
        (["--engine", "torch", "--kv-disk-gbps", "9"], "--kv-disk-gbps"),
        (["--no-prefix-caching", "--kv-host-mib", "8"], "--no-prefix-caching"),
    ],
)
def test_what_cannot_be_honoured_is_refused(argv: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        _cfg(argv)
