"""A thin typed wrapper over a `tokenizers.Tokenizer` plus the special ids generation needs.

The JSON behind it comes from a HF `tokenizer.json` or is rebuilt from GGUF metadata
(`dynamo_grpc.models.gguf_meta`); every process that tokenises (frontend, mocker, torch engine) loads
the same bytes, so token ids — and therefore KV block hashes — agree across the mesh.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers

if TYPE_CHECKING:
    from dynamo_grpc.models.card import ModelCard


class TokenizerError(ValueError):
    """Tokenizer bytes that do not parse, or ids outside the vocabulary."""


class Tokenizer:
    """Encode/decode with one tokenizer; ids outside the vocabulary raise `TokenizerError`."""

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
    ) -> None:
        self._tok = inner
        self._vocab_size = inner.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in inner.get_added_tokens_decoder().items() if t.special
        )
        self._ascii: dict[int, str] | None = None
        self._ascii_built = False

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_json_bytes(
        cls,
        data: bytes | str,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
    ) -> Tokenizer:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        try:
            inner = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"invalid tokenizer.json: {e}") from e
        return cls(inner, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)

    @classmethod
    def from_card(cls, card: ModelCard, tokenizer_json: bytes) -> Tokenizer:
        """The tokenizer a model card describes, from the bytes whose sha256 the card names."""
        from dynamo_grpc.models.card import sha256_hex

        got = sha256_hex(tokenizer_json)
        if got != card.tokenizer_sha256:
            raise TokenizerError(
                f"tokenizer bytes for {card.name!r} have sha256 {got}, card says {card.tokenizer_sha256}"
            )
        return cls.from_json_bytes(
            tokenizer_json,
            bos_token_id=card.bos_token_id,
            eos_token_ids=card.eos_token_ids,
            pad_token_id=card.pad_token_id,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A `tokenizer.json` file; special ids come from a sibling model directory when there is one."""
        p = Path(path)
        if p.is_dir() or p.suffix == ".gguf":
            return cls.from_model_source(p)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer file {p}: {e.strerror}") from e
        if (p.parent / "config.json").exists() and p.name == "tokenizer.json":
            return cls.from_model_source(p.parent)
        return cls.from_json_bytes(data)

    @classmethod
    def from_model_source(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of a GGUF file or HF model directory (see `load_model_source`)."""
        from dynamo_grpc.models.card import load_model_source

        card, tok_json = load_model_source(path)
        return cls.from_card(card, tok_json)

    # -- properties ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return self._vocab_size

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch APIs or offsets)."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    @property
    def ascii_table(self) -> dict[int, str] | None:
        """`ascii_pieces` once built (None before, or for a decoder that is not byte-level); never builds it."""
        return self._ascii

    def ascii_pieces(self) -> dict[int, str] | None:
        """Each plain vocabulary token whose text is pure ASCII, by id; None unless the decoder is byte-level.

        A byte-level decoder (GPT-2 style BPE) decodes a sequence to the UTF-8 of its tokens' bytes laid end
        to end, so after text that ended on a whole character, a run of these ids decodes to their pieces
        joined: `IncrementalDetokenizer` streams such runs without calling the decoder. Added (special or
        user) tokens are left out. Built on the first call (~0.1-0.3 s for a 49k vocabulary: the frontend
        builds it in a thread after a model is served; until then detokenising takes the decoder's way).
        """
        if not self._ascii_built:
            self._ascii_built = True
            if type(self._tok.decoder).__name__ == "ByteLevel":
                added = set(self._tok.get_added_tokens_decoder())
                ids = [i for i in range(self._tok.get_vocab_size(with_added_tokens=False)) if i not in added]
                texts = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
                self._ascii = {i: t for i, t in zip(ids, texts, strict=True) if t and t.isascii()}
        return self._ascii
    # -- encode/decode ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. `<|im_start|>`) map to their ids.

        `add_special_tokens=True` applies the tokenizer's post-processor (e.g. a BOS for models that
        want one); chat prompts are rendered by the template and encoded without it, as transformers does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        # encode_batch_fast: the same ids without the offsets `encode` computes and nobody here reads (~20 %
        # less CPU for a bench prompt, 12.4 vs 15.5 us; docs/scale-out.md "Fifth pass"); one text: no thread pool
        ids: list[int] = self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; incomplete UTF-8 at the end decodes to U+FFFD (see IncrementalDetokenizer)."""
        id_list = list(ids)
        for i in id_list:
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"token id {i} outside vocabulary of size {self._vocab_size}")
        return str(self._tok.decode(id_list, skip_special_tokens=skip_special_tokens))

    def to_json_bytes(self) -> bytes:
        return str(self._tok.to_str()).encode("utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids})"
