"""What each item of the frontend's KServe request path costs *inside* the path, not on its own.

`bench frontend-profile`'s `request_path_ms_per_request` (the whole KServe request path in one process without
gRPC: servicer, pipeline, a round-robin router, a stand-in worker) run once as it is and once per item with that
item replaced by a constant-time stand-in, in interleaved rounds; an item's cost is the median difference. A piece
timed alone (timeit) runs with warm caches; in the path it shares them with everything else and costs more
(docs/scale-out.md, "Fifth pass"): this is the number to weigh a cut by. The stand-ins are for measuring only:
each keeps the number of responses a request gets (the JSON records it, and the test checks it).

    dynamo-grpc bench frontend-items [--rounds N] [--frontend-src DIR] [--json FILE]
                                                     (bench/results/frontend-items.json)

`--against NAME=SRC` (repeatable) also runs the whole path of another source tree (e.g. the commit before a cut)
in the same rounds, and `--path-only` skips the stand-ins: a before/after of cuts too small for `bench frontend`
to resolve end to end, with the spread of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.frontend_profile import REQUEST_PATH
from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json

#: item -> code run before the servicer is built, replacing that item by a constant-time stand-in
STAND_INS: dict[str, str] = {
    "none": "",
    # the prompt's ids computed once per distinct text (a fresh list each time, as encode returns)
    "tokenise": """
from dynamo_grpc.tokens.tokenizer import Tokenizer as _T
_enc, _c = _T.encode, {}
def _cached(self, text, add_special_tokens=False):
    k = (text, add_special_tokens)
    if k not in _c:
        _c[k] = _enc(self, text, add_special_tokens)
    return list(_c[k])
_T.encode = _cached
""",
    # KServe tensors decoded and the LlmRequest built once (a shallow copy per request)
    "parse": """
import copy
import dynamo_grpc.frontend.kserve.service as _s
_pr, _di, _c = _s.parse_request, _s.decode_inputs, {}
def _prc(inputs, params, outputs, stream_rpc):
    if 0 not in _c:
        _c[0] = _pr(_di(inputs), params, outputs, stream_rpc=stream_rpc)
    return copy.copy(_c[0])
_s.decode_inputs, _s.parse_request, _s.parameters_dict = (lambda r: r), _prc, (lambda p: {})
""",
    # Prometheus series and Triton statistics not updated
    "metrics_stats": """
from dynamo_grpc.frontend.metrics import FrontendMetrics as _M
from dynamo_grpc.frontend.stats import StatsBook as _B
_M.started = lambda self, *a, **k: None
_M.finished = lambda self, *a, **k: None
_B.record_success = lambda self, *a, **k: None
""",
    # every message's text is "ab" (no vocabulary lookups, no UTF-8 hold-back)
    "detokenise": """
from dynamo_grpc.tokens.detok import IncrementalDetokenizer as _D
_D.add = lambda self, ids: "ab"
_D.flush = lambda self: ""
""",
    # a non-final streamed response is the first one's bytes again (the final one is built)
    "response_build": """
from dynamo_grpc.frontend.kserve.responses import Responder as _R
_sf, _c = _R.stream_frame, {}
def _f(self, c):
    if c.finish_reason is not None:
        return _sf(self, c)
    if 0 not in _c:
        _c[0] = _sf(self, c)
    return _c[0]
_R.stream_frame = _f
""",
}

#: item -> (module, attribute path) its stand-in replaces: a renamed target would make the stand-in a no-op
TARGETS: dict[str, list[tuple[str, str]]] = {
    "tokenise": [("dynamo_grpc.tokens.tokenizer", "Tokenizer.encode")],
    "parse": [
        ("dynamo_grpc.frontend.kserve.service", n) for n in ("parse_request", "decode_inputs", "parameters_dict")
    ],
    "metrics_stats": [("dynamo_grpc.frontend.metrics", "FrontendMetrics.started"),
                      ("dynamo_grpc.frontend.metrics", "FrontendMetrics.finished"),
                      ("dynamo_grpc.frontend.stats", "StatsBook.record_success")],
    "detokenise": [("dynamo_grpc.tokens.detok", "IncrementalDetokenizer.add"),
                   ("dynamo_grpc.tokens.detok", "IncrementalDetokenizer.flush")],
    "response_build": [("dynamo_grpc.frontend.kserve.responses", "Responder.stream_frame")],
}  # fmt: skip

#: REQUEST_PATH's loop sizes -> a quick run's (tests: the stand-ins still apply and keep the response count)
_QUICK = {"range(200)": "range(10)", "range(5)": "range(1)", "range(0, 1000, 50)": "range(0, 100, 50)",
          "written[0] / 5200": "written[0] / 110"}  # fmt: skip


def path_code(item: str, quick: bool = False) -> str:
    """REQUEST_PATH with ``item``'s stand-in installed before the servicer is built."""
    anchor = "registry = ModelRegistry"
    code = REQUEST_PATH
    if quick:
        for a, b in _QUICK.items():
            if a not in code:
                raise RuntimeError(f"REQUEST_PATH changed: {a!r} not found (update _QUICK)")
            code = code.replace(a, b)
    if anchor not in code:
        raise RuntimeError(f"REQUEST_PATH changed: {anchor!r} not found")
    return code.replace(anchor, STAND_INS[item] + "\n" + anchor, 1)


def run_item(item: str, src: str | None, quick: bool = False) -> dict[str, float]:
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    out = subprocess.run([sys.executable, "-c", path_code(item, quick)], env=env, capture_output=True, text=True,
                         check=True)  # fmt: skip
    res: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def measure(
    rounds: int, src: str | None, quick: bool = False, against: dict[str, str] | None = None, path_only: bool = False
) -> dict[str, Any]:
    """Interleaved rounds (every item, then every `against` tree, once per round); per item its ms per request and
    its cost (µs); per other tree its ms per request and what this tree saves against it (µs, same round)."""
    items_run = ["none"] if path_only else list(STAND_INS)
    runs: dict[str, list[dict[str, float]]] = {item: [] for item in items_run}
    other: dict[str, list[float]] = {name: [] for name in against or {}}
    for _ in range(rounds):
        for item in items_run:
            runs[item].append(run_item(item, src, quick))
        for name, tree in (against or {}).items():
            other[name].append(run_item("none", tree, quick)["ms_per_request"])
    ms = {item: [r["ms_per_request"] for r in rs] for item, rs in runs.items()}
    base = ms["none"]
    items: dict[str, Any] = {}
    for item, vals in ms.items():
        saved = [round((b - v) * 1e3, 1) for b, v in zip(base, vals, strict=True)]  # same round: µs per request
        items[item] = {
            "ms_per_request_rounds": vals,
            "responses_per_request": runs[item][0]["responses_per_request"],
            "cost_us_median": statistics.median(saved),
            "cost_us_rounds": sorted(saved),
        }
    trees: dict[str, Any] = {}
    for name, vals in other.items():
        saved = [round((v - b) * 1e3, 1) for b, v in zip(base, vals, strict=True)]
        trees[name] = {
            "src": (against or {})[name],
            "ms_per_request_rounds": vals,
            "ms_per_request_median": statistics.median(vals),
            "this_saves_us_median": statistics.median(saved),
            "this_saves_us_rounds": sorted(saved),
            "ratio_this_to_it_rounds": sorted(round(b / v, 3) for b, v in zip(base, vals, strict=True)),
        }
    return {"path_ms_per_request_median": statistics.median(base), "path_ms_per_request_rounds": base,
            "items": items, "against": trees}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = {k: v for k, v in result["items"].items() if k != "none"}
    if not items:  # --path-only: the whole path per tree
        trees = {"this tree": result["path_ms_per_request_rounds"]}
        trees.update({n: t["ms_per_request_rounds"] for n, t in result.get("against", {}).items()})
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, vals in enumerate(trees.values()):
            ax.bar(i, statistics.median(vals) * 1e3, color="#2a7" if i == 0 else "#888")
            ax.plot([i] * len(vals), [v * 1e3 for v in vals], "k.", ms=4)
        ax.set_xticks(range(len(trees)), list(trees), fontsize=8)
        ax.set_ylabel("µs of CPU per request (in-process KServe path)")
        ax.set_title("KServe request path per source tree (median, dots = interleaved rounds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(items)
    ax.bar(range(len(names)), [items[n]["cost_us_median"] for n in names], color="#2a7")
    for i, n in enumerate(names):
        ax.plot([i] * len(items[n]["cost_us_rounds"]), items[n]["cost_us_rounds"], "k.", ms=4)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("µs of CPU per request inside the path")
    ax.set_title(f"KServe request path {result['path_ms_per_request_median'] * 1e3:.0f} µs/request: "
                 f"cost of each item (median, dots = rounds)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=default_results_dir() / "frontend-items.json")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frontend-src", default=None, metavar="DIR", help="measure another source tree (its src/)")
    p.add_argument("--against", action="append", default=[], metavar="NAME=SRC",
                   help="also the whole path of another source tree (PYTHONPATH form), in the same rounds")
    p.add_argument("--path-only", action="store_true", help="skip the stand-ins: the whole path per tree only")
    args = p.parse_args(argv)
    against: dict[str, str] = {}
    for spec in args.against:
        name, sep, tree = spec.partition("=")
        if not sep or not name or not tree:
            p.error(f"--against {spec!r}: expected NAME=SRC")
        against[name] = tree
    result = measure(args.rounds, args.frontend_src, against=against, path_only=args.path_only)
    result.update(rounds=args.rounds, frontend_src=args.frontend_src or "this checkout", path_only=args.path_only,
                  loadavg_1m=os.getloadavg()[0], cpu_count=os.cpu_count())  # fmt: skip
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.json.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
