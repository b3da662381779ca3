"""`dynamo-grpc bench <name>`: run one benchmark (or `all`), each writing JSON + PNG.

`replay` ships in the package; the component benchmarks live in the repository's bench/
directory (bench/bench_<name>.py, each with ``main(argv)``) and run from a source checkout.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

PACKAGED = {"replay": "dynamo_grpc.bench.replay"}
SCRIPTS = ("router", "frontend", "engine", "discovery")
BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"
RESULTS = BENCH_DIR / "results"


def _load(name: str) -> Callable[[list[str]], int]:
    if name in PACKAGED:
        return importlib.import_module(PACKAGED[name]).main  # type: ignore[no-any-return]
    path = BENCH_DIR / f"bench_{name}.py"
    if not path.is_file():
        raise SystemExit(f"dynamo-grpc bench: {path} not found (component benchmarks run from a source checkout)")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = [*PACKAGED, *SCRIPTS]
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: dynamo-grpc bench {{{','.join(names)},all}} [--json OUT] [options]")
        print("Each benchmark compares ours with a baseline in one run; `bench <name> --help` for options.")
        return 0
    name, rest = args[0], args[1:]
    if name == "all":
        RESULTS.mkdir(parents=True, exist_ok=True)
        rc = 0
        for n in SCRIPTS:
            print(f"== bench {n}", flush=True)
            rc |= int(_load(n)(["--json", str(RESULTS / f"{n}.json"), *rest]) or 0)
        return rc
    if name not in names:
        print(f"dynamo-grpc bench: unknown benchmark '{name}' (one of {', '.join(names)}, all)", file=sys.stderr)
        return 2
    return int(_load(name)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
