"""The wheel, installed without extras into a throwaway venv, imports every contract module.

The test is offline: the wheel is installed with --no-deps and the base dependencies are
borrowed from the current environment by a .pth line placed after the venv's own
site-packages, so the wheel's own dynamo_grpc wins. It also checks the base install does
not pull torch: neither in the wheel's requirements nor at import time.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHECK = r"""
import importlib, pkgutil, sys
import dynamo_grpc
assert "site-packages" in dynamo_grpc.__file__, dynamo_grpc.__file__
mods = []
for pkg in ("dynamo_grpc.v1", "dynamo_grpc.kserve.v2"):
    p = importlib.import_module(pkg)
    assert "site-packages" in p.__file__, p.__file__
    for info in pkgutil.iter_modules(p.__path__):
        mods.append(importlib.import_module(f"{pkg}.{info.name}").__name__)
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc
from dynamo_grpc.kserve.v2 import grpc_service_pb2
assert router_pb2_grpc.RouterServiceStub and grpc_service_pb2.ModelInferRequest
assert "torch" not in sys.modules
from importlib.metadata import requires
base = [r for r in requires("dynamo-grpc") if "extra ==" not in r]
assert not any(r.lower().startswith(("torch", "transformers", "matplotlib")) for r in base), base
print(len(mods))
"""


@pytest.mark.slow
def test_wheel_without_extras_imports_every_generated_module(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("dynamo_grpc-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # borrow grpcio/protobuf from this environment, but not its editable dynamo_grpc finder
    (Path(site) / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == 14  # 7 protos x (_pb2, _pb2_grpc)

    # the benchmarks ship in the wheel: `dynamo-grpc bench` runs from it, results under --out
    small = ["--workers", "2", "--blocks", "500", "--decisions", "50", "--baseline-decisions", "10"]
    res = subprocess.run(
        [str(env_dir / "bin" / "dynamo-grpc"), "bench", "router", "--out", str(tmp_path / "res"), *small],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "res" / "router.json").is_file()
    res = subprocess.run([str(env_dir / "bin" / "dynamo-grpc"), "bench", "--help"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert f"default {tmp_path / 'bench' / 'results'}" in res.stdout  # no checkout: ./bench/results
