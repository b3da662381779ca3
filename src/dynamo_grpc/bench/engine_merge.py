"""`bench engine --merge`: one result from runs split by concurrency, and issue 22's targets read from it.

A full `bench engine` run (every mode, transformers, llama.cpp, three levels, three rounds) outlasts a fair
turn on a shared bench lock, so it is run one concurrency (or two) per command and merged here. Runs merge
only if they measured the same thing: same model, threads, rounds, systems, workload and library versions.
"""

from __future__ import annotations

from typing import Any

#: (name, concurrency, ratio key prefix, target); the best-mode llama.cpp target is computed over the modes
TARGETS: tuple[tuple[str, int, str, float], ...] = (
    ("fp32 single stream vs transformers", 1, "ours-fp32/transformers", 2.0),
    ("fp32 at 32 concurrent vs transformers", 32, "ours-fp32/transformers", 4.0),
)
LLAMA_TARGET = ("best mode single stream vs llama.cpp", 1, 0.7)
TTFT_TARGET = 5.0
#: what must be equal in every merged run (a difference would make the levels incomparable)
SAME = ("model", "num_threads", "rounds", "versions", "workload")


class MergeError(ValueError):
    """Runs that cannot be merged; the message names the field and the files."""


def _systems(result: dict[str, Any]) -> list[str]:
    return list(result["throughput"][0]["systems"]) if result["throughput"] else []


def merge(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One `bench engine` result from (file name, result) pairs measured at different concurrencies."""
    if len(runs) < 2:
        raise MergeError("--merge needs at least two result files")
    first_name, first = runs[0]
    for name, r in runs[1:]:
        for key in SAME:
            if r.get(key) != first.get(key):
                raise MergeError(f"{name} and {first_name} differ in {key!r}: {r.get(key)!r} vs {first.get(key)!r}")
        if _systems(r) != _systems(first):
            raise MergeError(f"{name} and {first_name} measured different systems: {_systems(r)} vs {_systems(first)}")
    levels: dict[int, str] = {}
    throughput = []
    for name, r in runs:
        for row in r["throughput"]:
            c = row["concurrency"]
            if c in levels:
                raise MergeError(f"concurrency {c} is in both {levels[c]} and {name}")
            levels[c] = name
            throughput.append(row)
    throughput.sort(key=lambda row: row["concurrency"])
    # the TTFT with the most repetitions; the limits of each run (single-stream bandwidth, top-level GFLOP/s)
    ttft_from = max(runs, key=lambda nr: len(nr[1]["ttft"].get("cold_s", [])))
    by_run = [
        {
            "file": name,
            "concurrency": [row["concurrency"] for row in r["throughput"]],
            "load_average": r.get("load_average"),
            "accuracy": r["accuracy"],
            "limits": r.get("limits", {}),
            "ttft": r["ttft"],
            "memory": r.get("memory", {}),
        }
        for name, r in runs
    ]
    merged = {k: first[k] for k in ("model", "num_threads", "rounds", "versions", "llama_cpp", "cpu_count", "workload")}
    merged |= {
        "merged_from": [name for name, _ in runs],
        "throughput": throughput,
        "accuracy": _accuracy(runs, throughput),
        "limits": next((r["limits"] for _, r in runs if r.get("limits")), {}),
        "ttft": ttft_from[1]["ttft"],
        "memory": first.get("memory", {}),
        "runs": by_run,
        "targets": first.get("targets", {}),
    }
    merged["target_results"] = targets(merged)
    return merged


def _count(pairs: list[str]) -> str:
    same = total = 0
    for p in pairs:
        a, b = (int(x) for x in p.split("/"))
        same, total = same + a, total + b
    return f"{same}/{total}"


def _accuracy(runs: list[tuple[str, dict[str, Any]]], throughput: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: requests identical to fp32's summed over the runs (round 0 of each level), perplexities as
    measured in each run (the same text); fp32 itself: identical to transformers over every round and level."""
    out: dict[str, Any] = {}
    for _, r in runs:
        for mode, acc in r["accuracy"].items():
            if not isinstance(acc, dict):
                out[mode] = acc
                continue
            cur = out.setdefault(mode, {"identical_pairs": [], "perplexity": [], "decode_perplexity": []})
            if "identical_requests" in acc and mode != "fp32":  # fp32 against itself says nothing
                cur["identical_pairs"].append(acc["identical_requests"])
            for key in ("perplexity", "decode_perplexity"):
                if key in acc:
                    cur[key].append(acc[key])
    for acc in out.values():
        if isinstance(acc, dict):
            pairs = acc.pop("identical_pairs")
            if pairs:
                acc["identical_to_fp32"] = _count(pairs)
    vs_hf = [row["fp32_vs_transformers"]["identical_requests"] for row in throughput if "fp32_vs_transformers" in row]
    if vs_hf and "fp32" in out:
        out["fp32"]["identical_to_transformers"] = _count(vs_hf)
    return out


def _ratio(row: dict[str, Any], key: str) -> dict[str, Any] | None:
    got = row["ratios_per_round"].get(key)
    return got if got else None


def _check(name: str, c: int, system: str, row: dict[str, Any] | None, prefix: str, target: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target": name, "concurrency": c, "system": system, "goal": target}
    if row is None:
        return out | {"missing": f"no concurrency {c} in the merged runs"}
    for metric, key in (("end_to_end", "tokens_per_s"), ("decode", "decode_tokens_per_s")):
        r = _ratio(row, f"{prefix} {key}")
        if r is None:
            out[metric] = {"missing": f"{prefix} {key} not measured"}
            continue
        out[metric] = {
            "median": r["median"], "min": r["min"], "max": r["max"],
            "met": r["median"] >= target, "met_every_round": r["min"] >= target,
        }  # fmt: skip
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 22 against the merged numbers: decode and end-to-end ratios, met or not."""
    rows = {row["concurrency"]: row for row in result["throughput"]}
    out = [_check(name, c, prefix.split("/")[0], rows.get(c), prefix, goal) for name, c, prefix, goal in TARGETS]
    name, c, goal = LLAMA_TARGET
    row = rows.get(c)
    modes = [s for s in (_systems(result) if row else []) if s.startswith("ours-")]
    checks = [_check(name, c, s, row, f"{s}/llama.cpp", goal) for s in modes]
    for ch in checks:
        ch["accuracy"] = result["accuracy"].get(ch["system"][5:], {})
    measured = [ch for ch in checks if "median" in ch.get("decode", {})]
    if measured:
        best = max(measured, key=lambda ch: ch["decode"]["median"])
        out.append(best | {"best_of": [ch["system"] for ch in measured], "each_mode": checks})
    else:
        out.append({"target": name, "concurrency": c, "goal": goal, "missing": "llama.cpp not measured at 1"})
    t = result["ttft"]
    speed = t["cold_median_s"] / t["warm_median_s"]
    out.append({"target": "prefix-hit TTFT cut", "goal": TTFT_TARGET, "speedup": speed, "met": speed >= TTFT_TARGET})
    return out


def _cell(d: dict[str, Any]) -> str:
    if "median" not in d:
        return d.get("missing", "not measured")
    met = "met" if d["met"] else "NOT met"
    return f"{d['median']:.2f}x ({d['min']:.2f}-{d['max']:.2f}), {met}"


def markdown(result: dict[str, Any]) -> str:
    """The tables the docs quote: tok/s per level and system, then each target."""
    lines = ["| concurrency | system | end-to-end tok/s | decode tok/s |", "|---|---|---|---|"]
    for row in result["throughput"]:
        for s, v in row["systems"].items():
            e, d = v["tokens_per_s"], v["decode_tokens_per_s"]
            lines.append(
                f"| {row['concurrency']} | {s} | {e['median']:.1f} ({e['min']:.1f}-{e['max']:.1f}) "
                f"| {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) |"
            )
    lines += ["", "| target | goal | end-to-end | decode |", "|---|---|---|---|"]
    for t in result["target_results"]:
        if "speedup" in t:
            lines.append(
                f"| {t['target']} | >= {t['goal']:g}x | {t['speedup']:.1f}x, {'met' if t['met'] else 'NOT met'} | |"
            )
            continue
        if "missing" in t:
            lines.append(f"| {t['target']} | >= {t['goal']:g}x | {t['missing']} | |")
            continue
        checks = t.get("each_mode", [t])
        for ch in checks:
            best = " (best)" if len(checks) > 1 and ch["system"] == t["system"] else ""
            label = f"{t['target']}: {ch['system']}{best}" if len(checks) > 1 else t["target"]
            lines.append(f"| {label} | >= {t['goal']:g}x | {_cell(ch['end_to_end'])} | {_cell(ch['decode'])} |")
    lines += ["", "| system | identical requests | perplexity | decode perplexity |", "|---|---|---|---|"]
    for mode, acc in result["accuracy"].items():
        if not isinstance(acc, dict):
            continue
        ppl = "/".join(sorted({f"{x:.4f}" for x in acc["perplexity"]}))
        dppl = "/".join(sorted({f"{x:.4f}" for x in acc["decode_perplexity"]})) or "-"
        if "identical_to_transformers" in acc:
            same = f"{acc['identical_to_transformers']} to transformers"
        elif "identical_to_fp32" in acc:
            same = f"{acc['identical_to_fp32']} to fp32"
        else:
            same = "-"
        lines.append(f"| {mode} | {same} | {ppl} | {dppl} |")
    return "\n".join(lines)
