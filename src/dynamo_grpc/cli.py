"""`dynamo-grpc <role>`: one binary, many roles (DESIGN.md, "Processes").

Each role lives in its own module with ``main(argv) -> int`` and its own argparse, so
``dynamo-grpc <role> --help`` is the role's help. Modules are imported only when their
role runs, so ``dynamo-grpc worker --engine mocker`` never imports torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: role -> (module with main(argv), one-line description)
ROLES: dict[str, tuple[str, str]] = {
    "frontend": ("dynamo_grpc.frontend.main", "KServe v2 gRPC (and OpenAI HTTP) frontend: tokenise, route, stream"),
    "router": ("dynamo_grpc.router.main", "KV-aware router: indexes KV events, picks a worker per request"),
    "global-router": (
        "dynamo_grpc.router.global_main",
        "global router: picks a worker pool by input/context length, then a worker by KV overlap",
    ),
    "worker": ("dynamo_grpc.worker.main", "worker hosting an engine (mocker | torch) behind Prefill/Decode"),
    "consul-dev": ("dynamo_grpc.consul_dev.main", "embedded Consul-compatible dev agent (HTTP API subset)"),
    "run-local": ("dynamo_grpc.launch.run_local", "start a whole mesh on this machine and print how to call it"),
    "profile": (
        "dynamo_grpc.planner.profiler",
        "sweep one worker (TTFT vs input length, ITL vs concurrency) for planner",
    ),
    "planner": ("dynamo_grpc.planner.main", "SLA planner: forecast load, scale worker pools (local | kubernetes)"),
    "bench": ("dynamo_grpc.bench.main", "benchmarks: router, frontend, engine, discovery, replay, or all"),
}



def command_lines(table: dict[str, tuple[str, str]]) -> list[str]:
    """One aligned `  name  description` line per entry of a (module, description) table."""
    width = max(map(len, table))
    return [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in table.items()]


def load_main(module_name: str, command: str) -> Callable[[list[str]], int]:
    """Import a command's module only now (its heavy dependencies stay out of other commands); its main.

    A missing third-party dependency (an extra not installed) exits with a message naming it.
    """
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("dynamo_grpc"):
            raise
        raise SystemExit(
            f"dynamo-grpc {command}: needs the {e.name!r} package, which is not installed "
            "(an optional extra: torch, bench, plot or planner; see README)"
        ) from None
    fn: Callable[[list[str]], int] = module.main
    return fn


def _usage() -> str:
    lines = [
        "usage: dynamo-grpc <role> [--help] [args...]",
        "",
        "A distributed LLM inference server: a typed gRPC service mesh.",
        "",
        "roles:",
        *command_lines(ROLES),
        "",
        "Run `dynamo-grpc <role> --help` for a role's options.",
    ]
    return "\n".join(lines)


def _entry(role: str) -> Callable[[list[str]], int]:
    return load_main(ROLES[role][0], role)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from dynamo_grpc import __version__

        print(f"dynamo-grpc {__version__}")
        return 0
    role, rest = args[0], args[1:]
    if role not in ROLES:
        print(f"dynamo-grpc: unknown role '{role}'\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(_entry(role)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
