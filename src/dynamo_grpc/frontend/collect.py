"""A unary answer: every chunk of a request gathered into one text, its logprobs and the last chunk's counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.v1 import common_pb2


@dataclass
class Collected:
    text: str
    last: Chunk  # finish_reason, token counts, worker
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


async def collect(chunks: AsyncIterator[Chunk], prefix: str = "") -> Collected:
    """Drain `chunks` (a pipeline's generate) into one result; `prefix` leads the text (an echoed prompt)."""
    parts = [prefix]
    lps: list[common_pb2.TokenLogprob] = []
    last: Chunk | None = None
    async for c in chunks:
        parts.append(c.text)
        lps.extend(c.logprobs)
        last = c
    assert last is not None, "a generation always ends with a finishing chunk"
    return Collected("".join(parts), last, lps)
