"""One-element raw tensors are decoded to a Python value without numpy (codec.decode_inputs' fast path).

The fast path must be invisible: the same value, the same lazily built `data`, the same request, and the same
refusals with the same messages as the numpy path (`_decode_raw`) for any bytes a client sends.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.bench.frontend import kserve_request
from dynamo_grpc.frontend.kserve import codec
from dynamo_grpc.frontend.kserve.codec import FIXED_DTYPES, NO_VALUE, Tensor, TensorError, decode_inputs
from dynamo_grpc.frontend.kserve.parse import parse_request
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

DTYPES = [*FIXED_DTYPES, "BYTES"]
SHAPES = [[1], [1, 1], []]


#: any short bytes, and well-formed BYTES elements (rare among random bytes)
_RAW = st.one_of(st.binary(max_size=9), st.binary(max_size=6).map(lambda b: struct.pack("<I", len(b)) + b))


def _request(dtype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype=dtype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


def _numpy_path(dtype: str, shape: list[int], raw: bytes) -> np.ndarray | TensorError:
    try:
        return codec._decode_raw("x", dtype, tuple(shape), raw)
    except TensorError as e:
        return e


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(DTYPES), st.sampled_from(SHAPES), _RAW)
def test_fast_path_decodes_and_refuses_like_numpy(dtype: str, shape: list[int], raw: bytes) -> None:
    want = _numpy_path(dtype, shape, raw)
    try:
        t = decode_inputs(_request(dtype, shape, raw))["x"]
    except TensorError as e:
        assert isinstance(want, TensorError), f"fast path refused what numpy decodes: {e}"
        assert str(e) == str(want) and e.tensor == "x"
        return
    assert not isinstance(want, TensorError), f"fast path accepted what numpy refuses: {want}"
    assert t.one is not NO_VALUE  # one element: decoded without numpy
    assert _same(t.one, want.item(0))
    assert t.size == 1 and t.shape == tuple(shape)
    assert t.data.shape == want.shape and t.data.dtype == want.dtype
    assert _same(t.data.item(0), want.item(0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_one_element_round_trips(dtype: str) -> None:
    value: object
    if dtype == "BYTES":
        value, raw = b"hello", struct.pack("<I", 5) + b"hello"
    else:
        arr = np.array([1], dtype=FIXED_DTYPES[dtype])
        value, raw = arr.item(0), arr.tobytes()
    t = decode_inputs(_request(dtype, [1, 1], raw))["x"]
    assert _same(t.one, value)
    assert t.data.shape == (1, 1)


def test_bench_request_parses_the_same_with_and_without_numpy() -> None:
    req = kserve_request("m", 7)
    fast = decode_inputs(req)
    assert all(t.one is not NO_VALUE for t in fast.values())
    slow = {n: Tensor(n, t.datatype, t.shape, t.data, t.parameters) for n, t in fast.items()}  # numpy arrays only
    assert all(t.one is NO_VALUE for t in slow.values())
    a = parse_request(fast, {}, None, stream_rpc=True)
    b = parse_request(slow, {}, None, stream_rpc=True)
    assert a == b
    assert a.prompt and a.stream


def test_bf16_scalar_parameter_reads_the_same_fast_and_slow() -> None:
    raw = struct.pack("<H", 0x3F00)  # 0.5
    req = _request("BF16", [1], raw)
    req.inputs[0].name = "temperature"
    fast = decode_inputs(req)
    slow = {"temperature": Tensor("temperature", "BF16", (1,), np.frombuffer(raw, "<u2").copy(), {})}
    for tensors in (fast, slow):
        r = parse_request({**tensors, **decode_inputs(kserve_request("m", 1))}, {}, None, stream_rpc=True)
        assert r.sampling.temperature == 0.5
