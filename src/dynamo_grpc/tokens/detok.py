"""Incremental detokenisation with stop strings, for streaming responses.

Token boundaries do not align with characters (byte-level BPE splits an emoji over several tokens) nor
with stop strings, so text is released only when it is final: never a partial UTF-8 character (the
decode ends in U+FFFD), never a suffix that might still grow into a stop string.

Decoding re-runs over a short sliding window of ids (as vLLM does) rather than the whole sequence,
so each step costs O(window), and decoders that depend on context (SentencePiece's leading space)
still see the previous tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context for the first decode (enough for any multi-token character).
_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def _ascii_pieces(tokenizer: _Decoder) -> dict[int, str] | None:
    """The tokenizer's ASCII token texts when built (`Tokenizer.ascii_table`; other decoders: None)."""
    table: dict[int, str] | None = getattr(tokenizer, "ascii_table", None)
    return table


class IncrementalDetokenizer:
    """Turns a stream of generated ids into a stream of final text pieces.

    `add(ids)` returns the newly released text (possibly ""), `flush()` the rest at the end of the
    stream. Once a stop string is seen, `stopped` is True, `stop_reason` names it, the text before it
    (plus the stop string itself when `include_stop_str`) has been released, and further ids are ignored.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str: bool = False,
    ) -> None:
        stops = list(stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ascii = _ascii_pieces(tokenizer)
        self._stops = stops
        self._max_stop = max((len(s) for s in stops), default=0)
        self._include_stop = include_stop_str
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._pending = ""  # decoded but not yet released (may be the start of a stop string)
        self._output: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """All text released so far."""
        return "".join(self._output)

    @property
    def num_generated(self) -> int:
        """Generated ids seen (prompt context excluded)."""
        return len(self._ids) - self._num_context

    def add(self, new_ids: Iterable[int]) -> str:
        """Feed generated ids; returns text that is now final."""
        if self.stopped:
            return ""
        ids = self._ids
        pieces = self._ascii
        if pieces is not None and self._read_offset == len(ids):  # the text so far ends on a whole character
            new = new_ids if isinstance(new_ids, list) else list(new_ids)
            try:
                text = "".join([pieces[i] for i in new])
            except KeyError:  # not a plain ASCII token: the decoder's way
                pass
            else:  # what `_decode_new` would release, without two decodes of the window
                ids.extend(new)
                self._prefix_offset = self._read_offset
                self._read_offset = len(ids)
                self._pending += text
                return self._release(final=False)
            ids.extend(new)
        else:
            ids.extend(new_ids)
        self._pending += self._decode_new()
        return self._release(final=False)

    def flush(self) -> str:
        """End of stream: release everything held back, including an unfinished character as U+FFFD."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):  # ids not yet released (else both decodes below are equal)
            prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
            full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
            if len(full) > len(prefix):
                self._pending += full[len(prefix) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _decode_new(self) -> str:
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def _release(self, final: bool) -> str:
        text = self._pending
        if self._stops:
            hit = self._find_stop(text)
            if hit is not None:
                pos, s = hit
                out = text[: pos + len(s)] if self._include_stop else text[:pos]
                self._pending = ""
                self.stopped = True
                self.stop_reason = s
                self._output.append(out)
                return out
            if not final:
                hold = self._held_suffix(text)
                out = text[: len(text) - hold]
                self._pending = text[len(text) - hold :]
                self._output.append(out)
                return out
        self._pending = ""
        self._output.append(text)
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stops:
            pos = text.find(s)
            if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(s) < len(best[1]))):
                best = (pos, s)
        return best

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for k in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
