"""`bench discovery --baseline-src DIR`: before/after in one run, rounds interleaved.

Each round runs the whole bench twice, once with another checkout's agent, fleet and watchers (``DIR``,
e.g. main's code: ``git archive main | tar -x -C DIR``) and once with this one's, alternating which goes
first, so that the shared box's noise lands on both sides. The summary gives, per phase, each side's
p50/p99 per round, their medians, the before/after ratio of the medians and the spread (min-max) over
rounds. ``--merge A.json B.json ...`` pools the rounds of several such runs (e.g. one per locked slot).
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SIDES = ("before", "after")


async def interleaved(rounds: int, run_side: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``rounds`` rounds of (before, after), the order flipped every round."""
    out: list[dict[str, Any]] = []
    for r in range(rounds):
        res: dict[str, Any] = {}
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            res[side] = await run_side(side)
        out.append(res)
    return {"rounds": out}


def _trim(result: dict[str, Any]) -> dict[str, Any]:
    """One side's result without the per-sample latencies and stage detail (the summary keeps the numbers)."""
    phases = {m: {k: v for k, v in ph.items() if k != "latencies_ms"} for m, ph in result["phases"].items()}
    return {**{k: v for k, v in result.items() if k != "phases"}, "phases": phases}


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per phase: per side the p50/p99 of each round, their medians and spread; after/before ratios."""
    rounds = doc["rounds"]
    modes = [m for m in rounds[0]["after"]["phases"] if all(m in r[s]["phases"] for r in rounds for s in SIDES)]
    summary: dict[str, Any] = {}
    for mode in modes:
        row: dict[str, Any] = {}
        for side in SIDES:
            for q in ("p50_ms", "p99_ms"):
                vals = [r[side]["phases"][mode][q] for r in rounds]
                row[f"{side}_{q}"] = [round(v, 1) for v in vals]
                row[f"{side}_{q}_median"] = round(statistics.median(vals), 1)
                row[f"{side}_{q}_spread"] = [round(min(vals), 1), round(max(vals), 1)]
        for q in ("p50_ms", "p99_ms"):
            row[f"{q}_before_over_after"] = round(row[f"before_{q}_median"] / max(1e-9, row[f"after_{q}_median"]), 2)
        row["after_p99_under_250ms_rounds"] = sum(1 for v in row["after_p99_ms"] if v < 250)
        summary[mode] = row
    loads = [r[s].get(k) for r in rounds for s in SIDES for k in ("loadavg_start", "loadavg_end")]
    return {"rounds": len(rounds), "phases": summary,
            "loadavg_range": [round(min(x for x in loads if x is not None), 2),
                              round(max(x for x in loads if x is not None), 2)]}


def finish(doc: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a compare run: per round each side's numbers, the raw latencies apart; the summary."""
    rounds = []
    for r in doc["rounds"]:
        lat = {s: {m: ph["latencies_ms"] for m, ph in r[s]["phases"].items()} for s in SIDES}
        rounds.append({**{s: _trim(r[s]) for s in SIDES}, "latencies_ms": lat})
    out = {**meta, "rounds": rounds}
    out["summary"] = summarize(out)
    return out


def merge(paths: list[Path], load: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The rounds of several compare runs as one (each run's settings must match)."""
    docs = [load(p) for p in paths]
    keys = ("instances", "watchers", "baseline_src_commit")
    for d in docs[1:]:
        for k in keys:
            if d.get(k) != docs[0].get(k):
                raise ValueError(f"cannot merge runs with different {k}: {docs[0].get(k)!r} vs {d.get(k)!r}")
    doc = {k: docs[0].get(k) for k in (*keys, "baseline_src")}
    doc["runs"] = [{"file": p.name, **{k: d.get(k) for k in ("after_commit", "wall_s", "trace_after", "changes")},
                    "rounds": len(d["rounds"])} for p, d in zip(paths, docs, strict=True)]
    doc["rounds"] = [{**r, "run": i} for i, d in enumerate(docs) for r in d["rounds"]]
    doc["summary"] = summarize(doc)
    return doc


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]["phases"]
    mode = "sharded" if "sharded" in summary else next(iter(summary))
    row = summary[mode]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    n = len(row["after_p99_ms"])
    xs = range(n)
    ax1.bar([x - 0.2 for x in xs], row["before_p99_ms"], width=0.4, label="before (main)", color="#c84")
    ax1.bar([x + 0.2 for x in xs], row["after_p99_ms"], width=0.4, label="after", color="#48c")
    ax1.axhline(250, color="k", ls="--", lw=1, label="target 250 ms")
    ax1.set_xticks(list(xs), [f"round {i + 1}" for i in xs], fontsize=8)
    ax1.set_ylabel("p99 change -> every watcher (ms)")
    ax1.set_title(f"{doc.get('instances')} instances, {doc.get('watchers')} watchers, {mode} watches: p99 per round")
    ax1.legend(fontsize=8)
    for side, color in (("before", "#c84"), ("after", "#48c")):
        lat = sorted(v for r in doc["rounds"] for v in r["latencies_ms"][side].get(mode, []))
        if lat:
            p50, p99 = row[f"{side}_p50_ms_median"], row[f"{side}_p99_ms_median"]
            ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], color=color,
                     label=f"{side}: p50 {p50:.0f} ms, p99 {p99:.0f} ms (medians of rounds)")
    ax2.axvline(250, color="k", ls="--", lw=1)
    ax2.set_xlabel("change -> watcher latency (ms), all rounds pooled")
    ax2.set_ylabel("fraction of (change, watcher) pairs")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
