"""The Dockerfile's build stage, without Docker: the files its .dockerignore lets into the context are enough to
build the wheel it installs, and that wheel carries the `dynamo-grpc` entrypoint and the generated contracts."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.deploy.layout import DEPLOY, ROOT


def in_context(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns we use: the last matching pattern (on the path or a parent) wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        negated, pat = pattern.startswith("!"), pattern.lstrip("!")
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            included = negated
    return included


def test_build_context_builds_the_wheel_the_image_installs(tmp_path: Path) -> None:
    patterns = [
        ln.strip()
        for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    ctx = tmp_path / "context"
    for rel in tracked:
        if in_context(rel, patterns) and (ROOT / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, ctx / rel)
    assert (ctx / "deploy" / "healthcheck.py").exists() and not (ctx / "tests").exists()
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ctx,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(tmp_path.glob("dynamo_grpc-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"dynamo_grpc/cli.py", "dynamo_grpc/kserve/v2/grpc_service_pb2.py", "dynamo_grpc/v1/router_pb2.py"} <= names
    assert "dynamo-grpc = dynamo_grpc.cli:main" in entry_points
