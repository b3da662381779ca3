"""Regenerate gen/ from protos/ (``make proto``): *_pb2.py, *_pb2_grpc.py and .pyi stubs.

Deterministic so ``make proto`` on a clean tree leaves ``git status`` clean, and used by the
staleness test, which generates into a temporary directory and compares.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
INIT_DOC = '"""Generated from protos/ by `make proto`; do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out: Path) -> None:
    """Generate every proto into ``out`` (replacing what was there)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *[str(p.relative_to(PROTOS)) for p in proto_files()],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    for pkg in sorted({p.parent for p in out.rglob("*_pb2.py")}):
        d = pkg
        while d != out:
            (d / "__init__.py").write_text(INIT_DOC)
            (d / "py.typed").write_text("")
            d = d.parent
    # dynamo_grpc/__init__.py belongs to src/; gen only contributes subpackages.
    (out / "dynamo_grpc" / "__init__.py").unlink()
    (out / "dynamo_grpc" / "py.typed").unlink()


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gen")
