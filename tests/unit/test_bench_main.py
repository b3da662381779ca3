"""`dynamo-grpc bench`: one home (the package), results under --out, plots only with the optional extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dynamo_grpc.bench.main import BENCHMARKS

SMALL_ROUTER = ["--workers", "4", "--blocks", "2000", "--chain-len", "8", "--decisions", "200",
                "--baseline-decisions", "50", "--memory-blocks", "1000"]  # fmt: skip


def _bench(*args: str, block_matplotlib: bool = False) -> subprocess.CompletedProcess[str]:
    block = (
        "sys.modules['matplotlib'] = None  # as if the plot extra were not installed\n"
        "rc = main(['bench', *sys.argv[1:]])\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib.')], 'matplotlib imported'\n"
    )
    code = "import sys\nfrom dynamo_grpc.cli import main\n" + (
        block if block_matplotlib else "rc = main(['bench', *sys.argv[1:]])\n"
    ) + "raise SystemExit(rc)\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )


def test_help_lists_every_benchmark() -> None:
    res = _bench("--help")
    assert res.returncode == 0
    for name in [*BENCHMARKS, "all"]:
        assert f"  {name} " in res.stdout
    assert "--out" in res.stdout


def test_results_go_under_out_and_plots_are_skipped_without_matplotlib(tmp_path: Path) -> None:
    res = _bench("router", "--out", str(tmp_path), *SMALL_ROUTER, block_matplotlib=True)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "router.json").read_text())
    assert result["workers"] == 4 and result["decisions"]["ours"]
    assert not (tmp_path / "router.png").exists()
    assert "plot skipped (router.png): matplotlib is not installed" in res.stderr


def test_plot_written_when_matplotlib_is_there(tmp_path: Path) -> None:
    res = _bench("router", f"--out={tmp_path}", *SMALL_ROUTER)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "router.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_invocations_fail_clearly(tmp_path: Path) -> None:
    res = _bench("nope")
    assert res.returncode == 2 and "unknown benchmark 'nope'" in res.stderr
    res = _bench("all", "--out", str(tmp_path), "--workers", "4")
    assert res.returncode == 2 and "takes only --out and --trace, not --workers 4" in res.stderr
    res = _bench("router", "--out")
    assert res.returncode != 0 and "--out needs a value" in res.stderr
