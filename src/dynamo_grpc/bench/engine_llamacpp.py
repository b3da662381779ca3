"""llama.cpp on the same GGUF, as the CPU user's alternative: its own ``llama-batched-bench`` binary.

No Python binding is needed (building llama-cpp-python from source takes most of an hour on 2 cores); a
``llama-batched-bench`` built from llama.cpp's tree (cmake, ``-DGGML_NATIVE=ON``, that target only; see
docs/torch-engine.md) is run with ``--output-format jsonl``. ``pl`` parallel sequences each prefill ``pp``
tokens and decode ``tg``: decode tok/s is ``pl·tg / t_tg`` and end-to-end ``pl·tg / t`` (prefill included),
the definitions the engine benchmark uses for ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

ENV = "DYN_LLAMA_CPP"
BINARY = "llama-batched-bench"


def find_binary(path: str | None) -> tuple[Path | None, str]:
    """The binary from ``--llama-cpp`` (a file or its build/bin folder), else ``$DYN_LLAMA_CPP``; or why not."""
    given = path or os.environ.get(ENV)
    if not given:
        found = shutil.which(BINARY)
        if found is None:
            return None, f"no --llama-cpp PATH, ${ENV} or {BINARY} on PATH: llama.cpp column skipped"
        given = found
    p = Path(given)
    if p.is_dir():
        p = p / BINARY
    if not (p.is_file() and os.access(p, os.X_OK)):
        return None, f"{p} is not an executable {BINARY}: llama.cpp column skipped"
    return p, ""


def run_batched(
    binary: Path, model: Path, prompt_tokens: int, gen_tokens: int, parallel: int, threads: int, timeout_s: float
) -> dict[str, Any]:
    """One ``llama-batched-bench`` run: ``parallel`` sequences of ``prompt_tokens`` + ``gen_tokens``."""
    ctx = parallel * (prompt_tokens + gen_tokens) + 64
    cmd = [
        str(binary), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
        "-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", str(parallel),
        "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not rows:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{binary.name} exited {out.returncode}: {' | '.join(tail)}")
    r = rows[-1]
    n_out = parallel * gen_tokens
    return {
        "output_tokens": n_out,
        "seconds": r["t"],
        "tokens_per_s": n_out / r["t"],
        "decode_tokens_per_s": n_out / r["t_tg"],
        "prefill_tokens_per_s": r["speed_pp"],
        "raw": r,
    }


def version(binary: Path) -> str:
    """``llama.cpp`` build number and commit, as the binary reports them."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return next((line for line in text if "version" in line), text[0] if text else "unknown")
