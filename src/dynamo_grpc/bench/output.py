"""Where benchmark results go, and plots as an optional extra.

Results default to `bench/results/` of the source checkout the package runs from (where the docs point), else
`./bench/results`; `dynamo-grpc bench --out DIR` overrides it. Every benchmark writes JSON; a PNG only when
matplotlib is installed (`pip install 'dynamo-grpc[plot]'`), so the base install never needs it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOT_HINT = "pip install 'dynamo-grpc[plot]'"


def checkout_root() -> Path | None:
    """The source checkout this package is imported from (an editable install), or None (a wheel)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "dynamo_grpc").is_dir() else None


def default_results_dir() -> Path:
    root = checkout_root()
    return (root if root is not None else Path.cwd()) / "bench" / "results"


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401  (imported only when a benchmark has something to plot)
    except ImportError:
        return False
    return True


def save_plot(draw: Callable[[Path], object], png: Path) -> Path | None:
    """Run `draw(png)` when matplotlib is installed; otherwise say the plot was skipped and return None."""
    if not can_plot():
        print(f"plot skipped ({png.name}): matplotlib is not installed ({PLOT_HINT})", file=sys.stderr, flush=True)
        return None
    png.parent.mkdir(parents=True, exist_ok=True)
    draw(png)
    return png
