"""KServe v2 tensor codec: request tensors to numpy and back, in both wire forms.

A tensor travels either in `raw_input_contents` / `raw_output_contents` (little-endian bytes; BYTES
elements each carry a 4-byte little-endian length prefix) or in the typed `contents` fields. Triton's
clients send raw and read raw, so a response uses raw when its request did (`encode_outputs(raw=True)`).
This module knows the wire rules only; which tensors an LLM request has is `schema.py`'s job.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dynamo_grpc.errors import InvalidArgument
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

#: Fixed-width datatypes and their little-endian numpy dtype. BF16 is carried as uint16 bits.
FIXED_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
DATATYPES = frozenset([*FIXED_DTYPES, "BYTES"])

# Which InferTensorContents field carries each datatype (FP16/BF16 have none: raw only, as in Triton).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LEN = struct.Struct("<I")
#: `Tensor.one` when the tensor was not decoded to a single Python value
NO_VALUE: Any = object()
#: shapes of one element that a raw tensor's fast path decodes without numpy ([1], Triton's batched [1, 1], scalar)
_ONE_SHAPES = frozenset([(1,), (1, 1), ()])
#: fixed-width datatype -> its one element's little-endian struct (BF16 stays uint16 bits, as in FIXED_DTYPES)
_ONE_STRUCT: dict[str, struct.Struct] = {
    dt: struct.Struct("<" + code)
    for dt, code in (("BOOL", "?"), ("UINT8", "B"), ("UINT16", "H"), ("UINT32", "I"), ("UINT64", "Q"), ("INT8", "b"),
                     ("INT16", "h"), ("INT32", "i"), ("INT64", "q"), ("FP16", "e"), ("FP32", "f"), ("FP64", "d"),
                     ("BF16", "H"))
}  # fmt: skip


class TensorError(InvalidArgument):
    """A tensor that does not decode: bad datatype, shape, size or contents. Names the tensor."""

    def __init__(self, tensor: str, message: str) -> None:
        super().__init__(f"tensor '{tensor}': {message}")
        self.tensor = tensor


class Tensor:
    """A decoded tensor. BYTES data is a numpy object array of `bytes`; BF16 is uint16 bit patterns.

    A one-element raw tensor (the prompt, the JSON parameters, scalar flags: every common KServe text request)
    is decoded straight to its Python value, `one`; its numpy `data` is built only if something reads it.
    """

    __slots__ = ("_data", "datatype", "name", "one", "parameters", "shape")

    def __init__(
        self,
        name: str,
        datatype: str,
        shape: tuple[int, ...],
        data: np.ndarray[Any, Any] | None,
        parameters: dict[str, bool | int | float | str],
        one: Any = NO_VALUE,
    ) -> None:
        self.name, self.datatype, self.shape, self.parameters = name, datatype, shape, parameters
        self._data = data
        self.one = one

    @property
    def data(self) -> np.ndarray[Any, Any]:
        if self._data is None:  # a one-element tensor decoded without numpy
            if self.datatype == "BYTES":
                arr = np.empty(1, dtype=object)
                arr[0] = self.one
            else:
                arr = np.array([self.one], dtype=FIXED_DTYPES[self.datatype])
            self._data = arr.reshape(self.shape)
        return self._data

    @property
    def size(self) -> int:
        return 1 if self._data is None else int(self._data.size)

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.datatype!r}, {self.shape!r}, {self.data!r}, {self.parameters!r})"


#: largest dimension a request tensor may declare (numpy cannot even shape an empty array past ~2^63 total)
MAX_DIM = 2**31 - 1


def element_count(name: str, shape: Sequence[int]) -> int:
    """Number of elements; every dimension must be in [0, MAX_DIM] (no wildcards in a request)."""
    n = 1
    for d in shape:
        if d < 0:
            raise TensorError(name, f"shape {list(shape)} has a negative dimension")
        if d > MAX_DIM:
            raise TensorError(name, f"shape {list(shape)} has a dimension above {MAX_DIM}")
        n *= d
    return n


def serialize_bytes(elements: Iterable[bytes | str]) -> bytes:
    """BYTES elements to raw form: each element as u32 little-endian length + bytes."""
    parts: list[bytes] = []
    for e in elements:
        b = e.encode("utf-8") if isinstance(e, str) else bytes(e)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(name: str, raw: bytes, count: int | None = None) -> list[bytes]:
    """Raw BYTES to elements; refuses truncated prefixes, overruns and (when given) a wrong count."""
    out: list[bytes] = []
    pos, end = 0, len(raw)
    mv = memoryview(raw)
    while pos < end:
        if end - pos < 4:
            raise TensorError(name, f"truncated BYTES length prefix at offset {pos}")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if n > end - pos:
            raise TensorError(name, f"BYTES element at offset {pos - 4} claims {n} bytes, {end - pos} remain")
        out.append(bytes(mv[pos : pos + n]))
        pos += n
    if count is not None and len(out) != count:
        raise TensorError(name, f"raw BYTES holds {len(out)} elements, shape needs {count}")
    return out


def parameter_value(p: pb.InferParameter) -> bool | int | float | str:
    """The Python value of an InferParameter (whichever oneof field is set)."""
    which = p.WhichOneof("parameter_choice")
    if which is None:
        return ""
    value: bool | int | float | str = getattr(p, which)
    return value


def parameters_dict(params: Any) -> dict[str, bool | int | float | str]:
    if not len(params):  # the usual case; a map's items() view costs more than the test
        return {}
    return {k: parameter_value(v) for k, v in params.items()}


def set_parameter(target: pb.InferParameter, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def _decode_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray[Any, Any]:
    # The declared count is checked against the bytes present before anything of that size is allocated: a 58-byte
    # request declaring [134217728] elements must not make the server build a 1 GiB array.
    count = element_count(name, shape)
    if datatype == "BYTES":
        elements = deserialize_bytes(name, raw, count)  # bounded by len(raw); checks the count
        arr = np.empty(count, dtype=object)
        arr[:] = elements
        return arr.reshape(shape)
    dt = FIXED_DTYPES[datatype]
    want = count * dt.itemsize
    if len(raw) != want:
        raise TensorError(name, f"raw {datatype} data is {len(raw)} bytes, shape {list(shape)} needs {want}")
    if datatype == "BOOL" and bytes(raw).translate(None, b"\x00\x01"):  # a byte left: not 0 or 1 (no ufunc call)
        raise TensorError(name, "raw BOOL data has bytes other than 0 and 1")
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


def _one_raw(datatype: str, raw: bytes) -> Any:
    """A one-element raw tensor's Python value (what `data.item(0)` gives), or NO_VALUE when the bytes do not fit
    (then `_decode_raw` decodes it and names what is wrong, so both paths refuse the same inputs alike)."""
    if datatype == "BYTES":
        if len(raw) >= 4 and _LEN.unpack_from(raw)[0] == len(raw) - 4:
            return raw[4:]
        return NO_VALUE
    st = _ONE_STRUCT[datatype]
    if len(raw) != st.size or (datatype == "BOOL" and raw[0] > 1):
        return NO_VALUE
    return st.unpack(raw)[0]


def _decode_contents(
    name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray[Any, Any]:
    count = element_count(name, shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(name, f"{datatype} data must be sent in raw_input_contents")
    # Data in another dtype's field is a client bug worth naming rather than ignoring.
    for other in set(_CONTENTS_FIELD.values()) - {field}:
        if len(getattr(contents, other)):
            raise TensorError(name, f"{datatype} tensor carries data in contents.{other}, expected {field}")
    present = len(getattr(contents, field))
    if present != count:  # before copying or allocating anything of the declared size
        raise TensorError(name, f"contents.{field} holds {present} elements, shape {list(shape)} needs {count}")
    values = list(getattr(contents, field))
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = [bytes(v) for v in values]
        return arr.reshape(shape)
    dt = FIXED_DTYPES[datatype]
    if dt.kind in "iu":
        info = np.iinfo(dt)
        for v in values:
            if not info.min <= v <= info.max:
                raise TensorError(name, f"value {v} does not fit {datatype}")
    return np.array(values, dtype=dt).reshape(shape)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    """All input tensors of a request by name; raises TensorError naming the first bad one."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(
            "raw_input_contents",
            f"{len(raw)} raw entries for {len(request.inputs)} inputs (raw inputs must be all or none)",
        )
    out: dict[str, Tensor] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        if not name:
            raise TensorError(f"#{i}", "input has no name")
        if name in out:
            raise TensorError(name, "input appears twice")
        if t.datatype not in DATATYPES:
            raise TensorError(name, f"unknown datatype {t.datatype!r}")
        shape = tuple(t.shape)  # int64 on the wire: already Python ints
        if raw:
            if t.HasField("contents") and t.contents.ByteSize():
                raise TensorError(name, "has both contents and raw_input_contents")
            params = parameters_dict(t.parameters)
            size = t.parameters.get("binary_data_size") if params else None
            if size is not None and size.WhichOneof("parameter_choice") and parameter_value(size) != len(raw[i]):
                raise TensorError(name, f"binary_data_size is {parameter_value(size)}, raw data is {len(raw[i])} bytes")
            if shape in _ONE_SHAPES:
                one = _one_raw(t.datatype, raw[i])
                if one is not NO_VALUE:
                    out[name] = Tensor(name, t.datatype, shape, None, params, one)
                    continue
            data = _decode_raw(name, t.datatype, shape, raw[i])
        else:
            params = parameters_dict(t.parameters)
            data = _decode_contents(name, t.datatype, shape, t.contents)
        out[name] = Tensor(name, t.datatype, shape, data, params)
    return out


def encode_outputs(response: pb.ModelInferResponse, tensors: Sequence[Tensor], *, raw: bool) -> None:
    """Append output tensors to a response, as raw_output_contents when `raw` else typed contents."""
    for t in tensors:
        out = response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        for k, v in t.parameters.items():
            set_parameter(out.parameters[k], v)
        flat = t.data.reshape(-1)
        if t.datatype == "BYTES":
            elements = [e if isinstance(e, bytes) else str(e).encode("utf-8") for e in flat]
            if raw:
                response.raw_output_contents.append(serialize_bytes(elements))
            else:
                out.contents.bytes_contents.extend(elements)
            continue
        dt = FIXED_DTYPES[t.datatype]
        if raw:
            response.raw_output_contents.append(np.ascontiguousarray(flat, dtype=dt).tobytes())
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise TensorError(t.name, f"{t.datatype} outputs can only be sent raw")
            getattr(out.contents, field).extend(flat.astype(dt).tolist())


def bytes_tensor(name: str, values: Sequence[bytes | str], shape: Sequence[int] | None = None) -> Tensor:
    arr = np.empty(len(values), dtype=object)
    arr[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    shp = tuple(shape) if shape is not None else (len(values),)
    return Tensor(name, "BYTES", shp, arr.reshape(shp), {})


def fixed_tensor(name: str, datatype: str, values: Sequence[Any], shape: Sequence[int] | None = None) -> Tensor:
    shp = tuple(shape) if shape is not None else (len(values),)
    return Tensor(name, datatype, shp, np.array(values, dtype=FIXED_DTYPES[datatype]).reshape(shp), {})


_SCALAR_PACK = {
    "INT32": struct.Struct("<i"),
    "INT64": struct.Struct("<q"),
    "UINT32": struct.Struct("<I"),
    "UINT64": struct.Struct("<Q"),
    "FP32": struct.Struct("<f"),
    "FP64": struct.Struct("<d"),
}


#: (name, datatype) of each output -> a response holding only those outputs' metadata (raw responses)
_SKELETONS: dict[tuple[tuple[str, str], ...], pb.ModelInferResponse] = {}


def _skeleton(key: tuple[tuple[str, str], ...]) -> pb.ModelInferResponse:
    skel = _SKELETONS.get(key)
    if skel is None:
        skel = pb.ModelInferResponse()
        for name, datatype in key:
            skel.outputs.add(name=name, datatype=datatype, shape=[1])
        if len(_SKELETONS) < 256:  # one per combination of requested outputs: a handful in practice
            _SKELETONS[key] = skel
    return skel


def raw_scalars(items: Sequence[tuple[str, str, bytes | str | int | float]]) -> list[bytes]:
    """The raw_output_contents of one-element outputs (their metadata is `output_skeleton`'s)."""
    chunks: list[bytes] = []
    for _, datatype, value in items:
        if datatype == "BYTES":
            b = value.encode("utf-8") if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
            chunks.append(_LEN.pack(len(b)) + b)
        else:
            chunks.append(_SCALAR_PACK[datatype].pack(value))
    return chunks


def output_skeleton(outputs: Sequence[tuple[str, str]]) -> pb.ModelInferResponse:
    """A response holding only the metadata of these one-element outputs (shared: copy or merge it)."""
    return _skeleton(tuple(outputs))


def encode_scalars(
    response: pb.ModelInferResponse, items: Sequence[tuple[str, str, bytes | str | int | float]], *, raw: bool
) -> None:
    """Append one-element ([1]) outputs without numpy: the per-token hot path of a streamed response.

    Produces exactly what `encode_outputs` produces for the same single-element tensors. With raw contents
    the outputs' metadata is merged from a cached skeleton (one C-level merge instead of a message per output).
    """
    if raw:
        response.MergeFrom(_skeleton(tuple((name, datatype) for name, datatype, _ in items)))
        response.raw_output_contents.extend(raw_scalars(items))
        return
    for name, datatype, value in items:
        out = response.outputs.add(name=name, datatype=datatype, shape=[1])
        if datatype == "BYTES":
            b = value.encode("utf-8") if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
            out.contents.bytes_contents.append(b)
        else:
            getattr(out.contents, _CONTENTS_FIELD[datatype]).append(value)
