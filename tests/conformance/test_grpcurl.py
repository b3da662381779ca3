"""grpcurl (a Go client, using server reflection only) against the frontend."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from dynamo_grpc.launch.mesh import Mesh
from tests.conformance.conftest import MODEL
from tests.helpers.grpcurl import grpcurl

pytestmark = pytest.mark.slow


def f(msg: dict, name: str) -> object:
    """A field by its proto name or its JSON (lowerCamel) name: grpcurl versions differ."""
    camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
    return msg.get(name, msg.get(camel))


SVC = "inference.GRPCInferenceService"


def test_reflection_lists_inference_service(mesh: Mesh) -> None:
    out = grpcurl(mesh.frontend_grpc, "list")
    assert out.returncode == 0, out.stderr
    assert SVC in out.stdout.split()
    desc = grpcurl(mesh.frontend_grpc, "describe", SVC)
    assert "stream .inference.ModelInferRequest" in desc.stdout


def test_grpcurl_metadata_and_infer(mesh: Mesh) -> None:
    live = grpcurl(mesh.frontend_grpc, f"{SVC}/ServerLive")
    assert json.loads(live.stdout) == {"live": True}
    meta = grpcurl(mesh.frontend_grpc, f"{SVC}/ModelMetadata", data={"name": MODEL})
    assert json.loads(meta.stdout)["name"] == MODEL
    req = {
        "model_name": MODEL,
        "id": "g1",
        "inputs": [
            {
                "name": "text_input",
                "datatype": "BYTES",
                "shape": [1],
                "contents": {"bytes_contents": [base64.b64encode(b"Hello from grpcurl").decode()]},
            },
            {"name": "max_tokens", "datatype": "INT32", "shape": [1], "contents": {"int_contents": [5]}},
            {
                "name": "exclude_input_in_output",
                "datatype": "BOOL",
                "shape": [1],
                "contents": {"bool_contents": [True]},
            },
        ],
    }
    out = grpcurl(mesh.frontend_grpc, f"{SVC}/ModelInfer", data=req)
    assert out.returncode == 0, out.stderr
    resp = json.loads(out.stdout)
    assert resp["id"] == "g1" and f(resp, "model_name") == MODEL
    outputs = {o["name"]: o for o in resp["outputs"]}
    # The request used typed contents, so the response does too.
    assert f(resp, "raw_output_contents") is None
    assert base64.b64decode(f(outputs["finish_reason"]["contents"], "bytes_contents")[0]) == b"length"
    assert f(outputs["num_output_tokens"]["contents"], "int_contents") == [5]
    assert base64.b64decode(f(outputs["text_output"]["contents"], "bytes_contents")[0])


def test_grpcurl_stream_and_raw(mesh: Mesh) -> None:
    text = b"stream me"
    raw = base64.b64encode(struct.pack("<I", len(text)) + text).decode()
    sp = json.dumps({"max_tokens": 6, "seed": 3}).encode()
    sp_raw = base64.b64encode(struct.pack("<I", len(sp)) + sp).decode()
    req = {
        "model_name": MODEL,
        "id": "gs",
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1]},
        ],
        "raw_input_contents": [raw, sp_raw],
    }
    out = grpcurl(mesh.frontend_grpc, f"{SVC}/ModelStreamInfer", data=req)
    assert out.returncode == 0, out.stderr
    msgs = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00") if m.strip()]
    assert len(msgs) >= 2
    responses = [f(m, "infer_response") for m in msgs]
    finals = [f(r["parameters"]["triton_final_response"], "bool_param") for r in responses]
    assert finals[-1] is True and not any(finals[:-1])
    assert all(f(r, "raw_output_contents") for r in responses)


def test_grpcurl_error_status(mesh: Mesh) -> None:
    req = {
        "model_name": MODEL,
        "inputs": [{"name": "text_input", "datatype": "INT32", "shape": [1], "contents": {"int_contents": [1]}}],
    }
    out = grpcurl(mesh.frontend_grpc, f"{SVC}/ModelInfer", data=req)
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr and "text_input" in out.stderr
