"""A request's text from its worker's tokens: detokenise, cut at stop strings and max_tokens, keep logprobs.

Protocol-neutral and synchronous: `TokenStream.add` turns one worker response (an engine step's tokens) into at most
one `Chunk`, so the streaming path costs no extra generator or task per token. The route session hands
it responses from whichever worker currently holds the request; the tokens it keeps (`generated`) are
what a migration resends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.tokens.detok import IncrementalDetokenizer
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass
class Chunk:
    """New text of a request; `finish_reason` is set on the last chunk."""

    text: str
    num_new_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    #: logprobs of this chunk's new tokens (when the request asked for them)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    #: sum of the sampled tokens' logprobs so far
    cumulative_logprob: float = 0.0
    #: on the last chunk: the global router's pool and reason for the last placement ("" without one)
    route_pool: str = ""
    route_reason: str = ""
    #: the prefill worker when the request was disaggregated ("" otherwise)
    prefill_worker_id: str = ""


class TokenStream:
    """Text state of one request across every worker it runs on."""

    def __init__(self, req: LlmRequest, prompt_ids: list[int], max_tokens: int, tokenizer: Tokenizer) -> None:
        self.detok = IncrementalDetokenizer(
            tokenizer,
            prompt_ids,
            skip_special_tokens=req.skip_special_tokens,
            stop=req.stop,
            include_stop_str=req.include_stop_str_in_output,
        )
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self.generated: list[int] = []
        self.cumulative = 0.0
        self.cached = 0
        self.finish: str | None = None
        self.finished_at_ns = 0

    def add(self, resp: worker_pb2.DecodeResponse, worker_id: str, first_placement: bool) -> Chunk | None:
        """The chunk for one worker response (None when it adds no text and does not finish)."""
        new = list(resp.token_ids)
        generated = self.generated
        overshoot = len(generated) + len(new) - self.max_tokens
        if overshoot > 0:  # a worker that ignores max_tokens is cut here
            new = new[: len(new) - overshoot]
        generated.extend(new)
        logprobs = resp.logprobs
        lps = list(logprobs[: len(new)]) if logprobs else []
        for lp in lps:
            self.cumulative += lp.logprob
        if first_placement and resp.HasField("usage"):
            self.cached = max(self.cached, resp.usage.cached_tokens)
        detok = self.detok
        text = detok.add(new)
        finish_reason = resp.finish_reason
        if detok.stopped:
            self.finish = "stop"
        elif finish_reason:
            self.finish = _FINISH.get(finish_reason, "stop")
            text += detok.flush()
        elif overshoot > 0:
            self.finish = "length"
            text += detok.flush()
        if self.finish is None and not text and not new:
            return None
        if self.finish is not None:
            self.finished_at_ns = time.perf_counter_ns()
        return self._chunk(text, len(new), worker_id, lps)

    def out_of_tokens(self, worker_id: str) -> Chunk:
        """The last chunk when max_tokens were all generated before the worker finished (lost at the end)."""
        self.finish = "length"
        self.finished_at_ns = time.perf_counter_ns()
        return self._chunk(self.detok.flush(), 0, worker_id, [])

    def _chunk(self, text: str, n: int, worker_id: str, lps: list[common_pb2.TokenLogprob]) -> Chunk:
        return Chunk(
            text, n, self.finish, self.prompt_tokens, len(self.generated), self.cached, worker_id, lps, self.cumulative
        )
