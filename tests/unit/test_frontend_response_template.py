"""Raw KServe responses are copied from a per-request template (frontend/kserve/responses.py): each one must
still be exactly what a from-scratch encoding gives, and a migration (new worker_id) must show in the next."""

from __future__ import annotations

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.frontend.kserve import schema
from dynamo_grpc.frontend.kserve.codec import decode_inputs, encode_scalars
from dynamo_grpc.frontend.kserve.responses import FINAL, Responder, base
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from tests.unit.test_frontend_pipeline import MODEL, source  # noqa: F401  (fixture)


def _expected(request: pb.ModelInferRequest, outs: list[str], text: str, finish: str, c: Chunk, new: int,
              final: bool) -> pb.ModelInferResponse:
    values = {"text_output": text, "finish_reason": finish, "num_input_tokens": c.prompt_tokens,
              "num_output_tokens": new, "cached_tokens": c.cached_tokens}
    resp = base(request)
    encode_scalars(resp, [(n, schema.OUTPUTS[n][0], values[n]) for n in outs], raw=True)
    resp.parameters["worker_id"].string_param = c.worker_id
    if c.finish_reason is not None:
        resp.parameters["prompt_tokens"].int64_param = c.prompt_tokens
        resp.parameters["completion_tokens"].int64_param = c.completion_tokens
        resp.parameters["cached_tokens"].int64_param = c.cached_tokens
        resp.parameters["disaggregated"].bool_param = bool(c.prefill_worker_id)  # the final response says it
    resp.parameters[FINAL].bool_param = final
    return resp


def test_templated_raw_responses_match_fresh_ones_across_a_migration(source) -> None:  # noqa: F811
    _, tok = source
    request = pb.ModelInferRequest(model_name=MODEL, id="req-7")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(b"Hi").to_bytes(4, "little") + b"Hi")  # raw in, raw out
    assert decode_inputs(request)
    req = LlmRequest(prompt="Hi", messages=None, stream=True, sampling=SamplingParams(), exclude_input_in_output=True)
    outs = list(req.requested_outputs)
    r = Responder(request, req, tok, stream_rpc=True)
    chunks = [
        Chunk(" one", 1, prompt_tokens=2, worker_id="w0"),
        Chunk(" two", 2, prompt_tokens=2, cached_tokens=1, worker_id="w0"),
        Chunk(" three", 1, prompt_tokens=2, worker_id="w1"),  # migrated: the next response names w1
        Chunk("!", 1, "stop", 2, 5, 1, "w1"),
    ]
    seen = []
    for c in chunks:
        got = r.chunk(c)
        assert got is not None
        want = _expected(request, outs, c.text, c.finish_reason or "", c, c.num_new_tokens, c.finish_reason is not None)
        assert got == want
        assert not got.outputs[0].contents.bytes_contents  # raw: the values are in raw_output_contents
        seen.append(got.parameters["worker_id"].string_param)
    assert seen == ["w0", "w0", "w1", "w1"]
