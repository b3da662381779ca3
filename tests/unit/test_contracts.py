"""The KServe contract is wire-compatible with Triton's grpc_service.proto.

tritonclient registers the same `inference` package in the default descriptor pool, so
Triton's descriptors are read in a subprocess and compared field by field with ours.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

_DUMP = r"""
import json, sys
mod = sys.argv[1]
if mod == "ours":
    from dynamo_grpc.kserve.v2 import grpc_service_pb2 as svc, model_config_pb2 as cfg
else:
    from tritonclient.grpc import service_pb2 as svc, model_config_pb2 as cfg

def fields(desc, prefix, out):
    for f in desc.fields:
        out[f"{prefix}.{f.name}"] = [f.number, f.type, f.is_repeated]
    for n in desc.nested_types:
        fields(n, f"{prefix}.{n.name}", out)

out = {}
for m in svc.DESCRIPTOR.message_types_by_name.values():
    fields(m, m.full_name, out)
for s in svc.DESCRIPTOR.services_by_name.values():
    for meth in s.methods:
        out[f"rpc {s.full_name}/{meth.name}"] = [meth.input_type.full_name, meth.output_type.full_name,
                                                meth.client_streaming, meth.server_streaming]
cfg_out = {}
for name in ("ModelConfig", "ModelInput", "ModelOutput", "ModelTransactionPolicy", "ModelParameter",
             "ModelInstanceGroup"):
    fields(cfg.DESCRIPTOR.message_types_by_name[name], name, cfg_out)
enum = {v.name: v.number for v in cfg.DESCRIPTOR.enum_types_by_name["DataType"].values}
print(json.dumps({"svc": out, "cfg": cfg_out, "dtype": enum}))
"""


def _dump(which: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _DUMP, which], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def test_grpc_service_matches_triton() -> None:
    # find_spec, not importorskip: importing tritonclient here would clash with our `inference` package
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (make test installs it)")
    ours, triton = _dump("ours"), _dump("triton")
    assert ours["svc"] == triton["svc"]
    assert ours["dtype"] == triton["dtype"]
    # our model_config is a subset: every field we define has Triton's number and type
    for key, spec in ours["cfg"].items():
        assert triton["cfg"].get(key) == spec, key
