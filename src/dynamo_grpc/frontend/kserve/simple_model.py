"""Triton's `simple` example model (INT32 INPUT0/INPUT1 [1,16] → OUTPUT0 sum, OUTPUT1 difference).

Served only with `--with-simple-model`, so the unmodified client examples of triton-inference-server/client
(`simple_grpc_infer_client.py` and friends) can be pointed at this frontend as a conformance check.
"""

from __future__ import annotations

import numpy as np

from dynamo_grpc.frontend.kserve.codec import Tensor, TensorError

NAME = "simple"
INPUTS = (("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16]))
OUTPUTS = (("OUTPUT0", "INT32", [-1, 16]), ("OUTPUT1", "INT32", [-1, 16]))
MAX_BATCH = 8


def run(inputs: dict[str, Tensor], requested: list[str]) -> list[Tensor]:
    """Element-wise sum and difference, as the Triton example model computes them."""
    for name, _, _ in INPUTS:
        if name not in inputs:
            raise TensorError(name, "missing required input")
        t = inputs[name]
        if t.datatype != "INT32":
            raise TensorError(name, f"datatype must be INT32, got {t.datatype}")
        if len(t.shape) != 2 or t.shape[1] != 16 or not 1 <= t.shape[0] <= MAX_BATCH:
            raise TensorError(name, f"shape must be [1..{MAX_BATCH}, 16], got {list(t.shape)}")
    a, b = inputs["INPUT0"].data, inputs["INPUT1"].data
    if a.shape != b.shape:
        raise TensorError("INPUT1", f"shape {list(b.shape)} differs from INPUT0 {list(a.shape)}")
    with np.errstate(over="ignore"):
        results = {"OUTPUT0": (a + b).astype(np.int32), "OUTPUT1": (a - b).astype(np.int32)}
    names = requested or [n for n, _, _ in OUTPUTS]
    out: list[Tensor] = []
    for n in names:
        if n not in results:
            raise TensorError(n, "unknown requested output")
        out.append(Tensor(n, "INT32", tuple(results[n].shape), results[n], {}))
    return out
