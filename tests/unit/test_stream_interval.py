"""worker/stream_interval.py: which engine outputs a Decode stream sends, merged, and which it holds."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import EngineOutput, TokenLogprob
from dynamo_grpc.worker.stream_interval import StreamInterval


def _out(*ids: int, finish: str | None = None) -> EngineOutput:
    return EngineOutput(list(ids), finish, prompt_tokens=5, logprobs=[TokenLogprob(i, -float(i)) for i in ids])


def test_interval_one_sends_every_output_as_it_is() -> None:
    s = StreamInterval(1)
    outs = [_out(1), _out(2, 3), _out(4, finish="length")]
    assert [s.add(o) for o in outs] == outs


def test_first_token_alone_then_batches_then_the_finish_with_what_is_left() -> None:
    s = StreamInterval(3)
    first = s.add(_out(1))
    assert first is not None and first.token_ids == [1]
    assert s.add(_out(2)) is None and s.add(_out(3)) is None
    sent = s.add(_out(4, 5))  # 4 tokens >= 3
    assert sent is not None and sent.token_ids == [2, 3, 4, 5]
    assert [lp.token_id for lp in sent.logprobs or []] == [2, 3, 4, 5]
    assert s.add(_out(6)) is None
    last = s.add(_out(7, finish="stop"))
    assert last is not None and last.token_ids == [6, 7] and last.finish_reason == "stop"


def test_a_finish_without_tokens_is_sent_at_once_and_flush_returns_what_is_held() -> None:
    s = StreamInterval(4)
    assert s.add(_out(1)) is not None
    assert s.add(_out(2)) is None
    held = s.flush()  # e.g. before the stream ends "cancelled": the client gets the tokens it was owed
    assert held is not None and held.token_ids == [2] and s.flush() is None
    s2 = StreamInterval(4)
    s2.add(_out(1))
    done = s2.add(EngineOutput([], "stop"))
    assert done is not None and done.finish_reason == "stop"


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="--stream-interval must be >= 1"):
        StreamInterval(0)
