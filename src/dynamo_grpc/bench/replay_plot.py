"""Plots of a replay: TTFT CDF per router, p50/p99 bars, and the prefix hit rate against its bound."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

matplotlib.use("Agg")  # files only; never a display

COLORS = {"kv": "tab:green", "round-robin": "tab:orange", "random": "tab:red"}


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i}")


def plot_replay(
    ttfts: Mapping[str, Sequence[float]],
    summaries: Mapping[str, Mapping[str, Any]],
    out: str | Path,
    title: str,
) -> Path:
    """One PNG: TTFT CDF (trace seconds, log x), TTFT p50/p99 bars, hit rate vs infinite-cache bound."""
    names = list(ttfts)
    fig, (ax_cdf, ax_bar, ax_hit) = plt.subplots(1, 3, figsize=(16, 4.8), width_ratios=[1.4, 1, 0.8])
    for i, name in enumerate(names):
        v = np.sort(np.asarray([x for x in ttfts[name] if np.isfinite(x)], dtype=np.float64))
        if v.size:
            ax_cdf.step(v, np.arange(1, v.size + 1) / v.size, where="post", color=_color(name, i), label=name)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("TTFT (s, trace time)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("TTFT CDF")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(loc="lower right")

    x = np.arange(len(names))
    p50 = [summaries[n]["ttft_s"]["p50"] or 0.0 for n in names]
    p99 = [summaries[n]["ttft_s"]["p99"] or 0.0 for n in names]
    b1 = ax_bar.bar(x - 0.2, p50, 0.4, label="p50", color=[_color(n, i) for i, n in enumerate(names)])
    b2 = ax_bar.bar(
        x + 0.2, p99, 0.4, label="p99", color=[_color(n, i) for i, n in enumerate(names)], alpha=0.5, hatch="//"
    )
    ax_bar.bar_label(b1, fmt="%.2f", fontsize=8)
    ax_bar.bar_label(b2, fmt="%.2f", fontsize=8)
    ax_bar.set_xticks(x, names)
    ax_bar.set_ylabel("TTFT (s, trace time)")
    ax_bar.set_title("TTFT p50 (solid) / p99 (hatched)")
    ax_bar.grid(True, axis="y", alpha=0.3)

    hits = [100.0 * (summaries[n]["prefix_cache"]["hit_rate"] or 0.0) for n in names]
    b3 = ax_hit.bar(x, hits, 0.6, color=[_color(n, i) for i, n in enumerate(names)])
    ax_hit.bar_label(b3, fmt="%.1f%%", fontsize=8)
    bound = next((summaries[n]["prefix_cache"]["infinite_cache_bound"] for n in names), None)
    if bound is not None:
        ax_hit.axhline(
            100.0 * bound, color="k", linestyle="--", linewidth=1, label=f"infinite cache {100 * bound:.1f}%"
        )
        ax_hit.legend(loc="upper right", fontsize=8)
    cvs = [summaries[n]["load_balance"]["requests_cv"] for n in names]
    ax_hit.set_xticks(x, [f"{n}\nCV {cv:.2f}" if cv is not None else n for n, cv in zip(names, cvs, strict=True)])
    ax_hit.set_ylabel("prefix cache hit rate (%)")
    ax_hit.set_title("hit rate (CV: requests/worker)")
    ax_hit.grid(True, axis="y", alpha=0.3)

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
