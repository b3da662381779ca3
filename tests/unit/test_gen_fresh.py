"""gen/ must be exactly what `make proto` produces from protos/ (CI fails when it is stale)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_gen_matches_protos(tmp_path: Path) -> None:
    gen = _load_generator()
    gen.generate(tmp_path / "gen")
    fresh, committed = _tree(tmp_path / "gen"), _tree(ROOT / "gen")
    assert sorted(fresh) == sorted(committed), "gen/ file list is stale: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"gen/ is stale against protos/ ({', '.join(stale)}): run `make proto`"


def test_every_proto_has_generated_modules() -> None:
    for proto in (ROOT / "protos").rglob("*.proto"):
        rel = proto.relative_to(ROOT / "protos").with_suffix("")
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            assert (ROOT / "gen" / f"{rel}{suffix}").is_file(), f"missing gen/{rel}{suffix}"
