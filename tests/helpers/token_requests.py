"""KServe requests on pre-tokenised prompts, for integration tests that route by token ids.

Why one place: the mesh tests (KV routing, disaggregation, the global router) build the same `input_ids` +
`sampling_parameters` request and the same deterministic, seed-distinct prompts.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb


def prompt(seed: int, n: int) -> list[int]:
    """``n`` token ids, deterministic in ``seed``, sharing no leading block with another seed's."""
    return [(seed * 7919 + i * 31) % 40_000 + 100 for i in range(n)]


def token_request(model: str, ids: list[int], max_tokens: int = 4, **sampling: Any) -> pb.ModelInferRequest:
    """A ModelInfer request for ``ids`` that generates exactly ``max_tokens`` (ignore_eos) plus ``sampling``."""
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype="INT32", shape=[len(ids)])
    req.raw_input_contents.append(struct.pack(f"<{len(ids)}i", *ids))
    body = json.dumps({"max_tokens": max_tokens, "ignore_eos": True, **sampling}).encode()
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(body)) + body)
    return req
