"""Fuzzing a REAL frontend (mocker mesh): random and mutated ModelInferRequests and malformed HTTP bodies.

Every request is answered with a status that is never INTERNAL/UNKNOWN, no process dies, and at the end
no route or admission place is held (router active sequences and the in-flight gauge are zero).
CI runs a few hundred examples; `DYN_FUZZ_EXAMPLES=5000` runs a bigger campaign (counts are printed).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.integration.test_frontend_limits import settled

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
EXAMPLES = int(os.environ.get("DYN_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 250,  # CI: the same examples every run; a campaign explores
    suppress_health_check=list(HealthCheck),
)
#: statuses a client may get for a hostile request; INTERNAL / UNKNOWN would be a server bug
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
SEEN: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    m = Mesh(MeshConfig(workers=2, speedup_ratio=1000.0, http_port=0, ready_timeout_s=90.0)).start()
    try:
        yield m
    finally:
        print(f"\nfuzz outcomes ({EXAMPLES} examples per test): {dict(sorted(SEEN.items()))}")
        m.stop()


# -- KServe requests ----------------------------------------------------------------------------------

NAMES = ["text_input", "sampling_parameters", "max_tokens", "input_ids", "stream", "stop", "top_k", "messages", "zz"]
DTYPES = ["BYTES", "INT32", "INT64", "UINT64", "UINT32", "FP32", "FP16", "BF16", "BOOL", "INT8", "STRING", ""]
dims = st.one_of(st.integers(0, 4), st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**27, 2**31, 2**40, 2**62]))
json_bomb = st.sampled_from(
    [b"[" * 20000 + b"]" * 20000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"seed": ' + b"9" * 5000 + b"}"]
)
sampling_json = st.one_of(
    json_bomb,
    st.dictionaries(
        st.sampled_from(["max_tokens", "top_k", "min_tokens", "stop_token_ids", "seed", "temperature", "n", "x"]),
        st.one_of(
            st.integers(-(2**70), 2**70),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.lists(st.integers(-1, 2**40), max_size=3),
        ),
        max_size=4,
    ).map(lambda d: json.dumps({"max_tokens": 3, **d}).encode()),
)
payload = st.one_of(
    st.binary(max_size=64),
    st.just("héllo wörld".encode()),
    st.just(b"\xff\xfe\xfd"),
    sampling_json,
)


def _bytes_raw(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@st.composite
def tensor(draw: Any, raw: bool) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    name = draw(st.sampled_from(NAMES))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(dims, min_size=0, max_size=3))
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=shape)
    mode = draw(st.sampled_from(["well_formed", "random", "truncated"]))
    data = draw(payload)
    if mode == "well_formed":
        body = _bytes_raw([data]) if dtype in ("BYTES", "STRING", "") else data
    elif mode == "truncated":
        body = _bytes_raw([data])[: draw(st.integers(0, 6))]
    else:
        body = draw(st.binary(max_size=32))
    if raw:
        return t, body
    if dtype == "BYTES":
        t.contents.bytes_contents.append(data)
    elif dtype in ("INT32", "INT8", "BOOL"):
        t.contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)))
    elif dtype in ("UINT64", "UINT32"):
        t.contents.uint64_contents.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=4)))
    return t, None


@st.composite
def infer_request(draw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, MODEL, MODEL, "", "nope"])),
        model_version=draw(st.sampled_from(["", "", "1", "2"])),
        id=draw(st.one_of(st.text(max_size=20), st.just("i" * 300))),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 4))):
        t, body = draw(tensor(raw))
        req.inputs.append(t)
        if body is not None:
            req.raw_input_contents.append(body)
    if draw(st.booleans()):  # a valid prompt, so that many requests reach routing and generation
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        if raw or draw(st.booleans()):
            req.raw_input_contents.append(_bytes_raw([b"fuzz me"]))
        else:
            req.inputs[-1].contents.bytes_contents.append(b"fuzz me")
    params = st.dictionaries(
        st.sampled_from(["max_tokens", "stream", "timeout", "top_k", "seed", "foo"]),
        st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), st.text(max_size=4)),
        max_size=2,
    )
    for key, value in draw(params).items():
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        else:
            p.string_param = value
    return req


@st.composite
def mutated(draw: Any) -> pb.ModelInferRequest:
    """A valid request with bytes of its serialised form flipped, dropped or repeated."""
    good = pb.ModelInferRequest(model_name=MODEL, id="m")
    good.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    good.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    good.raw_input_contents.extend([_bytes_raw([b"hello"]), _bytes_raw([b'{"max_tokens": 3}'])])
    data = bytearray(good.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "drop", "dup"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "drop":
            del data[i]
        else:
            data[i:i] = data[i : i + draw(st.integers(1, 8))]
        if not data:
            break
    try:
        return pb.ModelInferRequest.FromString(bytes(data))
    except Exception:  # not a message any more: the wire would never carry it past grpc's parser
        return good


def _call(stub: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest) -> None:
    try:
        stub.ModelInfer(req, timeout=30)
        SEEN["grpc OK"] += 1
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        SEEN[f"grpc {code.name}"] += 1
        assert code in ALLOWED, f"{code.name}: {e.details()}\\nrequest: {str(req)[:800]}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stub(mesh: Mesh) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(mesh.frontend_grpc) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


@FUZZ
@given(req=infer_request())
def test_fuzz_model_infer(stub: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest) -> None:
    _call(stub, req)


@FUZZ
@given(req=mutated())
def test_fuzz_mutated_model_infer(stub: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest) -> None:
    _call(stub, req)


# -- HTTP bodies ----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
OPENAI_KEYS = ["model", "prompt", "messages", "max_tokens", "stream", "top_k", "min_tokens", "logit_bias", "user", "n",
               "stop", "logprobs", "stream_options", "seed", "temperature", "tools", "echo"]  # fmt: skip
_PROMPT = {"prompt": "hi"}
_CHAT = {"messages": [{"role": "user", "content": "hi"}]}
http_body = st.one_of(
    st.binary(max_size=64),
    json_bomb,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(
        st.sampled_from([_PROMPT, _CHAT]), st.dictionaries(st.sampled_from(OPENAI_KEYS), json_values, max_size=3)
    ).map(lambda bd: json.dumps({"model": MODEL, "max_tokens": 3, **bd[0], **bd[1]}).encode()),
)


@pytest.fixture(scope="module")
def http(mesh: Mesh) -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(retries=False, timeout=30) as pool:
        yield pool


@FUZZ
@given(body=http_body)
def test_fuzz_openai_bodies(mesh: Mesh, http: urllib3.PoolManager, body: bytes) -> None:
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    r = http.request(
        "POST", f"http://{mesh.frontend_http}{path}", body=body, headers={"Content-Type": "application/json"}
    )
    SEEN[f"http {r.status}"] += 1
    assert r.status < 500, r.data[:500]
    if r.status != 200:
        assert "error" in json.loads(r.data), r.data[:200]


def test_nothing_died_and_nothing_leaked(mesh: Mesh) -> None:
    """Runs last in this module: every process is alive and every route / admission place was freed."""
    for p in mesh.procs:
        assert p.popen.poll() is None, p.exit_line()
    asyncio.run(settled(f"http://{mesh.frontend_http}"))
