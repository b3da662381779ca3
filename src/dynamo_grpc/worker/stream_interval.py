"""How many tokens a Decode message carries: ``--stream-interval N`` (a CPU-for-smoothness trade).

By default (N = 1) the worker sends what is ready: every engine output becomes one DecodeResponse, and
tokens that piled up while the previous message was being written are already merged into one output by
the engine driver (``engines/core/driver.py``, ``_Stream.take``), so nothing ever waits. With N > 1 the
worker holds a request's tokens until N are ready (or the request finishes), so each message, each
frontend read and each client response carries N tokens: fewer messages per request, less CPU per
request in the worker, the frontend and any hop between, at the price of tokens arriving in bursts of
N steps. The first token is always sent alone and at once (time to first token never changes), and the
last message goes as soon as the request finishes, whatever it holds. Per-token fields (logprobs) stay
per token in the merged message.
"""

from __future__ import annotations

from dynamo_grpc.engines.base import EngineOutput


class StreamInterval:
    """Merges a request's engine outputs into messages of at least ``interval`` tokens."""

    __slots__ = ("_held", "_sent_first", "interval")

    def __init__(self, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"--stream-interval must be >= 1, got {interval}")
        self.interval = interval
        self._held: EngineOutput | None = None
        self._sent_first = False

    def add(self, out: EngineOutput) -> EngineOutput | None:
        """The output to send now (``out``, or the held tokens merged with it), or None to hold it."""
        if self.interval == 1 or out.lease is not None:
            return out  # send what is ready; a prefill's lease output is never held
        if not self._sent_first:
            if out.token_ids or out.finish_reason is not None:
                self._sent_first = True
            return out  # the first token goes alone, at once
        held = self._held
        if held is None:
            held = out
        else:
            held.token_ids = [*held.token_ids, *out.token_ids]
            if out.logprobs:
                held.logprobs = [*(held.logprobs or []), *out.logprobs]
            held.finish_reason = out.finish_reason
            held.cached_tokens = out.cached_tokens
            held.prompt_tokens = out.prompt_tokens or held.prompt_tokens
        if held.finish_reason is None and len(held.token_ids) < self.interval:
            self._held = held
            return None
        self._held = None
        return held

    def flush(self) -> EngineOutput | None:
        """The tokens held back, if any (sent before the stream ends without a finish)."""
        held, self._held = self._held, None
        return held
