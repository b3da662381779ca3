"""ModelInferResponses for one LLM request: prompt echo, token hold-back, outputs by name, the final flag.

As Triton's vLLM backend: `text_output` leads with the prompt unless `exclude_input_in_output`; on a
decoupled stream each chunk of text is one response and the last carries `triton_final_response` (or, with
the `triton_enable_empty_final_response` parameter, an extra empty response does). Tokens that produced
no text yet (a partial character) are counted on the next response that carries text.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_grpc.frontend import logprobs
from dynamo_grpc.frontend.collect import Collected
from dynamo_grpc.frontend.kserve import schema, wire
from dynamo_grpc.frontend.kserve.codec import encode_scalars, output_skeleton, raw_scalars
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2

FINAL = "triton_final_response"
#: outputs whose value differs in (nearly) every response: packed each time, never kept
_PACKED_EACH_TIME = frozenset({"text_output", "logprobs", "cumulative_logprob"})
#: outputs whose non-final value is the text or a token count (cached in `Responder.stream_frame`)
_SCALAR_OUTPUTS = frozenset({"text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "cached_tokens"})


def used_raw(request: pb.ModelInferRequest) -> bool:
    """Triton's clients send raw and expect raw; a request without inputs gets raw too."""
    return bool(request.raw_input_contents) or not request.inputs


def base(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)


class Responder:
    """Builds the responses of one request (stream or unary) from its chunks."""

    def __init__(self, request: pb.ModelInferRequest, req: LlmRequest, tokenizer: Tokenizer, stream_rpc: bool):
        self.request = request
        self.req = req
        self.tokenizer = tokenizer
        self.stream_rpc = stream_rpc
        self.raw = used_raw(request)
        # the prompt text leads the output unless exclude_input_in_output is set
        self.prefix = req.prompt if (req.prompt is not None and not req.exclude_input_in_output) else ""
        self.pending_tokens = 0
        self.pending_lps: list[common_pb2.TokenLogprob] = []
        # raw responses: what every response of this request shares (ids, outputs' metadata, worker_id),
        # built once per worker and copied (one C-level copy instead of rebuilding it for every token)
        self._template: pb.ModelInferResponse | None = None
        self._template_worker = ""
        # on a stream, each response is built inside the ModelStreamInferResponse that carries it (wrapping
        # a finished response would copy it again): `wrapped` hands that carrier back
        self._holder: pb.ModelStreamInferResponse | None = None
        self._types = [(n, schema.OUTPUTS[n][0]) for n in req.requested_outputs]
        # raw contents of the outputs that repeat from response to response (token counts, an empty
        # finish_reason), packed once per value; text and logprobs are packed each time
        self._packed: dict[tuple[str, object], bytes] = {}
        self._template_bytes = b""
        # `stream_frame`: the encoded raw_output_contents fields of repeating values
        self._fields: dict[tuple[str, object], bytes] = {}
        # the usual outputs (text and token counts, text requested once): `stream_frame` caches the bytes
        # around the text per (worker, counts)
        names = [n for n, _ in self._types]
        self._scalars_only = names.count("text_output") == 1 and set(names) <= _SCALAR_OUTPUTS
        self._around: dict[tuple[str, int, int, int], tuple[bytes, bytes]] = {}

    def _new(self) -> pb.ModelInferResponse:
        if not self.stream_rpc:
            return pb.ModelInferResponse()
        self._holder = pb.ModelStreamInferResponse()
        return self._holder.infer_response

    def _base(self) -> pb.ModelInferResponse:
        resp = self._new()
        resp.model_name, resp.model_version, resp.id = self.request.model_name, "1", self.request.id
        return resp

    def wrapped(self, resp: pb.ModelInferResponse) -> pb.ModelStreamInferResponse:
        """The stream message carrying ``resp`` (the one it was built in, else a copy in a new one)."""
        holder = self._holder
        if holder is not None and holder.infer_response is resp:
            return holder
        return pb.ModelStreamInferResponse(infer_response=resp)

    def _take(self, c: Chunk) -> tuple[str, int, list[common_pb2.TokenLogprob]] | None:
        """This chunk's text (after any prompt echo), and the tokens and logprobs it carries, counting those
        of earlier chunks that made no text; None while there is no text yet (they ride on the next)."""
        self.pending_tokens += c.num_new_tokens
        if c.logprobs:
            self.pending_lps.extend(c.logprobs)
        text = self.prefix + c.text if self.prefix else c.text
        if not text and c.finish_reason is None:
            return None
        self.prefix = ""
        taken = (text, self.pending_tokens, self.pending_lps)
        self.pending_tokens = 0
        self.pending_lps = []
        return taken

    def chunk(self, c: Chunk) -> pb.ModelInferResponse | None:
        """The response for one streamed chunk: None while its tokens made no text yet (they ride on the next)."""
        taken = self._take(c)
        if taken is None:
            return None
        final = c.finish_reason is not None
        resp = self._response(taken[0], c.finish_reason or "", c, taken[1], taken[2])
        if final or not self.raw:  # a raw response's template already says false
            resp.parameters[FINAL].bool_param = final and not self.req.empty_final_response
        return resp

    def stream_frame(self, c: Chunk) -> bytes | pb.ModelStreamInferResponse | None:
        """ModelStreamInfer's message for one chunk (None: no text yet). A raw response that is not the last is
        built as bytes (`wire.py`: the template's bytes plus this response's outputs); others as messages."""
        if not self.raw or c.finish_reason is not None:
            resp = self.chunk(c)
            return None if resp is None else self.wrapped(resp)
        taken = self._take(c)
        if taken is None:
            return None
        text, new_tokens, lps = taken
        self._template_for(c.worker_id)
        if self._scalars_only:  # text and counts: what surrounds the text is cached per (worker, counts)
            counts = (c.worker_id, c.prompt_tokens, new_tokens, c.cached_tokens)
            around = self._around.get(counts)
            if around is None:
                around = self._around[counts] = self._around_text(c, new_tokens)
            return wire.stream_response(around[0], [wire.raw_text_field(text), around[1]])
        values = self._values(text, "", c, new_tokens, lps)
        fields: list[bytes] = []
        for name, datatype in self._types:
            value = values[name]
            if name in ("text_output", "logprobs"):
                fields.append(wire.raw_text_field(str(value)))
            else:
                key = (name, value)
                f = self._fields.get(key)
                if f is None:
                    f = wire.raw_output_field(self._raw(name, datatype, value))
                    if name != "cumulative_logprob":  # a new value in (nearly) every response: not kept
                        self._fields[key] = f
                fields.append(f)
        return wire.stream_response(self._template_bytes, fields)

    def _around_text(self, c: Chunk, new_tokens: int) -> tuple[bytes, bytes]:
        """The bytes before the text output's field (the template and the outputs listed before it) and after."""
        values = self._values("", "", c, new_tokens, [])
        head: list[bytes] = [self._template_bytes]
        tail: list[bytes] = []
        part = head
        for name, datatype in self._types:
            if name == "text_output":
                part = tail
                continue
            part.append(wire.raw_output_field(self._raw(name, datatype, values[name])))
        return b"".join(head), b"".join(tail)

    def unary(self, r: Collected) -> pb.ModelInferResponse:
        """The one response of ModelInfer (or of stream=false on ModelStreamInfer)."""
        resp = self._response(r.text, r.last.finish_reason or "stop", r.last, r.last.completion_tokens, r.logprobs)
        if self.stream_rpc:
            resp.parameters[FINAL].bool_param = not self.req.empty_final_response
        return resp

    def empty_final(self) -> pb.ModelInferResponse | None:
        """After the last data response of a stream: the empty final response, when the client asked for it."""
        if not (self.stream_rpc and self.req.empty_final_response):
            return None
        empty = self._base()
        empty.parameters[FINAL].bool_param = True
        return empty

    def _template_for(self, worker_id: str) -> pb.ModelInferResponse:
        """The raw responses' shared part for this worker (rebuilt after a migration), and its bytes."""
        if self._template is None or self._template_worker != worker_id:
            t = base(self.request)
            t.MergeFrom(output_skeleton(self._types))
            t.parameters["worker_id"].string_param = worker_id
            if self.stream_rpc:  # false on every response but the last (set there)
                t.parameters[FINAL].bool_param = False
            self._template, self._template_worker = t, worker_id
            self._template_bytes = t.SerializeToString()
        return self._template

    def _raw(self, name: str, datatype: str, value: bytes | str | int | float) -> bytes:
        if name in _PACKED_EACH_TIME:
            return raw_scalars([(name, datatype, value)])[0]
        key = (name, value)
        b = self._packed.get(key)
        if b is None:
            b = self._packed[key] = raw_scalars([(name, datatype, value)])[0]
        return b

    def _values(
        self, text: str, finish: str, c: Chunk, new_tokens: int, lps: Sequence[common_pb2.TokenLogprob]
    ) -> dict[str, bytes | str | int | float]:
        """Each output's value in one response (logprobs and cumulative_logprob only when requested)."""
        values: dict[str, bytes | str | int | float] = {
            "text_output": text,
            "finish_reason": finish,
            "num_input_tokens": c.prompt_tokens,
            "num_output_tokens": new_tokens,
            "cached_tokens": c.cached_tokens,
        }
        outs = self.req.requested_outputs
        if "logprobs" in outs:
            values["logprobs"] = logprobs.triton_json(lps, self.tokenizer)
        if "cumulative_logprob" in outs:
            values["cumulative_logprob"] = c.cumulative_logprob
        return values

    def _response(
        self, text: str, finish: str, c: Chunk, new_tokens: int, lps: Sequence[common_pb2.TokenLogprob]
    ) -> pb.ModelInferResponse:
        values = self._values(text, finish, c, new_tokens, lps)
        if self.raw:
            resp = self._new()
            resp.CopyFrom(self._template_for(c.worker_id))
            resp.raw_output_contents.extend([self._raw(n, dt, values[n]) for n, dt in self._types])
        else:
            resp = self._base()
            encode_scalars(resp, [(n, dt, values[n]) for n, dt in self._types], raw=False)
            resp.parameters["worker_id"].string_param = c.worker_id  # changes when a request migrates
        if c.finish_reason is not None:
            # Per-request token accounting on the last response (benchmarks read them).
            resp.parameters["prompt_tokens"].int64_param = c.prompt_tokens
            resp.parameters["completion_tokens"].int64_param = c.completion_tokens
            resp.parameters["cached_tokens"].int64_param = c.cached_tokens
            if c.route_pool:  # the global router's decision (docs/global-router.md)
                resp.parameters["route_pool"].string_param = c.route_pool
                resp.parameters["route_reason"].string_param = c.route_reason
            resp.parameters["disaggregated"].bool_param = bool(c.prefill_worker_id)
            if c.prefill_worker_id:
                resp.parameters["prefill_worker_id"].string_param = c.prefill_worker_id
        return resp
