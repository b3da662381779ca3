"""KServe v2 tensor codec: BYTES raw and contents, every datatype, shape and size errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamo_grpc.frontend.kserve.codec import (
    FIXED_DTYPES,
    Tensor,
    TensorError,
    bytes_tensor,
    decode_inputs,
    deserialize_bytes,
    encode_outputs,
    fixed_tensor,
    serialize_bytes,
)
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

CONTENT_DTYPES = [d for d in FIXED_DTYPES if d not in ("FP16", "BF16")]


def _values(dtype: str) -> list[object]:
    if dtype == "BOOL":
        return [True, False, True, True]
    if dtype == "BF16":  # bit patterns of 1.0, -2.0, 0.5, 0.0
        return [0x3F80, 0xC000, 0x3F00, 0]
    if dtype.startswith("FP"):
        return [0.5, -1.25, 3.0, 1e3]
    if dtype.startswith("UINT"):
        info = np.iinfo(FIXED_DTYPES[dtype])
        return [0, 1, 7, int(info.max)]
    info = np.iinfo(FIXED_DTYPES[dtype])
    return [int(info.min), -1, 0, int(info.max)]


def _raw_request(name: str, dtype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name=name, datatype=dtype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


def test_bytes_raw_layout_is_le_length_prefixed() -> None:
    raw = serialize_bytes([b"ab", "é", b""])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 0)
    assert deserialize_bytes("t", raw) == [b"ab", "é".encode(), b""]


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_bytes_round_trip(elements: list[bytes]) -> None:
    assert deserialize_bytes("t", serialize_bytes(elements), len(elements)) == elements


@pytest.mark.parametrize(
    ("raw", "msg"),
    [
        (b"\x01\x00", "truncated BYTES length prefix"),
        (struct.pack("<I", 5) + b"abc", "claims 5 bytes"),
        (serialize_bytes([b"a", b"b"]), "holds 2 elements, shape needs 1"),
    ],
)
def test_bytes_raw_malformed(raw: bytes, msg: str) -> None:
    with pytest.raises(TensorError, match=msg) as ei:
        decode_inputs(_raw_request("text_input", "BYTES", [1], raw))
    assert ei.value.tensor == "text_input"
    assert "text_input" in str(ei.value)


def test_bytes_contents_decode() -> None:
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="s", datatype="BYTES", shape=[2, 1])
    t.contents.bytes_contents.extend([b"x", b"yz"])
    got = decode_inputs(req)["s"]
    assert got.shape == (2, 1) and got.data.reshape(-1).tolist() == [b"x", b"yz"]


@pytest.mark.parametrize("dtype", list(FIXED_DTYPES))
def test_every_fixed_dtype_raw_round_trip(dtype: str) -> None:
    vals = _values(dtype)
    arr = np.array(vals, dtype=FIXED_DTYPES[dtype]).reshape(2, 2)
    req = _raw_request("x", dtype, [2, 2], arr.tobytes())
    got = decode_inputs(req)["x"]
    assert got.datatype == dtype and got.shape == (2, 2)
    np.testing.assert_array_equal(got.data, arr)
    resp = pb.ModelInferResponse()
    encode_outputs(resp, [got], raw=True)
    assert resp.raw_output_contents[0] == arr.tobytes()
    assert list(resp.outputs[0].shape) == [2, 2] and resp.outputs[0].datatype == dtype


@pytest.mark.parametrize("dtype", CONTENT_DTYPES)
def test_every_content_dtype_round_trip(dtype: str) -> None:
    vals = _values(dtype)
    t = fixed_tensor("x", dtype, vals)
    resp = pb.ModelInferResponse()
    encode_outputs(resp, [t], raw=False)
    assert not resp.raw_output_contents
    # Feed the response's contents back as a request.
    req = pb.ModelInferRequest()
    out = resp.outputs[0]
    req.inputs.add(name="x", datatype=dtype, shape=out.shape).contents.CopyFrom(out.contents)
    got = decode_inputs(req)["x"]
    np.testing.assert_array_equal(got.data, np.array(vals, dtype=FIXED_DTYPES[dtype]))


@pytest.mark.parametrize("dtype", list(FIXED_DTYPES))
def test_raw_size_mismatch_names_tensor(dtype: str) -> None:
    itemsize = FIXED_DTYPES[dtype].itemsize
    with pytest.raises(TensorError, match=r"tensor 'x': raw .* needs"):
        decode_inputs(_raw_request("x", dtype, [3], b"\x00" * (itemsize * 3 + 1)))


@pytest.mark.parametrize("dtype", ["FP16", "BF16"])
def test_half_types_refuse_contents(dtype: str) -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="h", datatype=dtype, shape=[1])
    with pytest.raises(TensorError, match="must be sent in raw_input_contents"):
        decode_inputs(req)


def test_contents_count_mismatch() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="i", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2])
    with pytest.raises(TensorError, match=r"contents.int_contents holds 2 elements, shape \[3\] needs 3"):
        decode_inputs(req)


def test_contents_in_wrong_field() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="i", datatype="INT32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(TensorError, match="expected int_contents"):
        decode_inputs(req)


def test_contents_value_out_of_range() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="i", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(TensorError, match="does not fit INT8"):
        decode_inputs(req)


def test_raw_bool_rejects_non_binary_bytes() -> None:
    with pytest.raises(TensorError, match="BOOL"):
        decode_inputs(_raw_request("b", "BOOL", [1], b"\x02"))


@pytest.mark.parametrize(("shape", "msg"), [([-1], "negative dimension"), ([2, -3], "negative dimension")])
def test_negative_shape(shape: list[int], msg: str) -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="INT32", shape=shape)
    with pytest.raises(TensorError, match=msg):
        decode_inputs(req)


def test_unknown_datatype() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="x", datatype="FLOAT32", shape=[1])
    with pytest.raises(TensorError, match="unknown datatype 'FLOAT32'"):
        decode_inputs(req)


def test_raw_count_must_match_inputs() -> None:
    req = _raw_request("a", "INT32", [1], b"\x00" * 4)
    req.inputs.add(name="b", datatype="INT32", shape=[1])
    with pytest.raises(TensorError, match="2 inputs"):
        decode_inputs(req)


def test_raw_and_contents_together() -> None:
    req = _raw_request("a", "INT32", [1], b"\x00" * 4)
    req.inputs[0].contents.int_contents.append(1)
    with pytest.raises(TensorError, match="both contents and raw"):
        decode_inputs(req)


def test_duplicate_and_unnamed_inputs() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="a", datatype="INT32", shape=[0])
    req.inputs.add(name="a", datatype="INT32", shape=[0])
    with pytest.raises(TensorError, match="appears twice"):
        decode_inputs(req)
    req = pb.ModelInferRequest()
    req.inputs.add(name="", datatype="INT32", shape=[0])
    with pytest.raises(TensorError, match="no name"):
        decode_inputs(req)


def test_zero_element_tensor() -> None:
    got = decode_inputs(_raw_request("z", "FP32", [0, 4], b""))["z"]
    assert got.shape == (0, 4) and got.size == 0


def test_bytes_outputs_raw_and_contents() -> None:
    t = bytes_tensor("text_output", ["héllo"])
    raw = pb.ModelInferResponse()
    encode_outputs(raw, [t], raw=True)
    assert deserialize_bytes("t", raw.raw_output_contents[0]) == ["héllo".encode()]
    typed = pb.ModelInferResponse()
    encode_outputs(typed, [t], raw=False)
    assert list(typed.outputs[0].contents.bytes_contents) == ["héllo".encode()]


def test_parameters_survive() -> None:
    req = pb.ModelInferRequest()
    t = req.inputs.add(name="x", datatype="INT32", shape=[0])
    t.parameters["flag"].bool_param = True
    t.parameters["n"].int64_param = 3
    got: Tensor = decode_inputs(req)["x"]
    assert got.parameters == {"flag": True, "n": 3}


@pytest.mark.parametrize("raw", [True, False])
def test_encode_scalars_matches_encode_outputs(raw: bool) -> None:
    from dynamo_grpc.frontend.kserve.codec import encode_scalars

    items = [
        ("t", "BYTES", "héllo"),
        ("n", "INT32", -7),
        ("u", "UINT64", 2**63),
        ("f", "FP32", 0.5),
        ("b", "BYTES", b""),
    ]
    fast = pb.ModelInferResponse()
    encode_scalars(fast, items, raw=raw)
    slow = pb.ModelInferResponse()
    tensors = [bytes_tensor(n, [v]) if d == "BYTES" else fixed_tensor(n, d, [v]) for n, d, v in items]  # type: ignore[list-item]
    encode_outputs(slow, tensors, raw=raw)
    assert fast == slow


@pytest.mark.parametrize("shape", [[134217728], [2**40], [2**62, 2**62], [0, 2**62], [2**31, 2**31, 2**31]])
@pytest.mark.parametrize("dtype", ["BYTES", "INT32", "FP64", "BOOL"])
def test_huge_declared_shape_is_refused_without_allocating(shape: list[int], dtype: str) -> None:
    """A tiny request declaring a huge tensor is INVALID_ARGUMENT, and the server never builds the array."""
    import tracemalloc

    raw = struct.pack("<I", 5) + b"hello" + b"\x00" * 45  # ~58 bytes on the wire, as in the probe
    tracemalloc.start()
    try:
        with pytest.raises(TensorError, match="tensor 'text_input'"):
            decode_inputs(_raw_request("text_input", dtype, shape, raw))
        req = pb.ModelInferRequest()
        req.inputs.add(name="text_input", datatype=dtype, shape=shape)
        with pytest.raises(TensorError, match="tensor 'text_input'"):
            decode_inputs(req)  # typed contents: empty, the shape declares many
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a refused tensor allocated {peak} bytes"


def test_bytes_shape_needs_four_bytes_per_element() -> None:
    """BYTES: the elements present are counted before the declared count is allocated."""
    with pytest.raises(TensorError, match=r"raw BYTES holds 2 elements, shape needs 3"):
        decode_inputs(_raw_request("s", "BYTES", [3], serialize_bytes([b"", b""])))
