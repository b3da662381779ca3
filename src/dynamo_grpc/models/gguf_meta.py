"""Read a GGUF file's metadata and rebuild the HF `tokenizer.json` it describes.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
ids as metadata. The frontend and the engines want one tokenizer format, so we rebuild a
`tokenizers` JSON from those keys, choosing the pre-tokenizer the way llama.cpp does from
`tokenizer.ggml.pre` (llama-vocab.cpp maps that name to a list of split regexes).
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

log = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> pre-tokenizer family (llama.cpp's llama-vocab.cpp groups them the same way)
_PRE_GPT2 = {"gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "default"}
_PRE_DIGITS_GPT2 = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"}
_PRE_QWEN2 = {"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"}


class GgufError(ValueError):
    """The file is not a GGUF we can describe (missing keys, unsupported tokenizer)."""


def read_with_gguf_reader(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata via `gguf.GGUFReader` (the reference; slow: it builds a numpy view per array element)."""
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on junk input
        raise GgufError(f"{path}: not a readable GGUF file ({e})") from e
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


class _KvParser:
    """A little-endian GGUF v2/v3 key/value section parser; stops before the tensor table."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past end of file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == gguf.GGUFValueType.BOOL:
            return bool(self.unpack("<B"))
        if vtype == gguf.GGUFValueType.STRING:
            return self.string()
        if vtype == gguf.GGUFValueType.ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype])
                end = self.pos + dt.itemsize * count
                if end > len(self.buf):
                    raise ValueError("array runs past end of file")
                arr = np.frombuffer(self.buf[self.pos : end], dtype=dt)
                self.pos = end
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def _read_fast(path: str) -> dict[str, Any] | None:
    """Parse only the header and key/values (tens of ms); None when the file needs the reference reader."""
    if os.path.getsize(path) < 24:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            if struct.unpack_from("<I", buf, 0)[0] != gguf.GGUF_MAGIC:
                return None
            p = _KvParser(buf)
            p.pos = 4
            version = p.unpack("<I")
            if version not in (2, 3):
                return None  # v1 or a big-endian file: leave it to GGUFReader
            p.unpack("<Q")  # tensor count
            kv_count = p.unpack("<Q")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = p.string()
                meta[key] = p.value(p.unpack("<I"))
            return meta
        except (ValueError, struct.error, UnicodeDecodeError):
            return None
        finally:
            buf.release()


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    meta = _read_fast(path)
    return meta if meta is not None else read_with_gguf_reader(path)


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/values of a GGUF file as plain Python values (cached per path, mtime and size).

    Opening a GGUF parses the tensor table too (seconds for a 100 MB file), so repeated calls for the
    same unchanged file are served from memory. Callers must not mutate the result.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise GgufError(f"{p}: cannot open ({e.strerror})") from e
    return _read_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _byte_level_pre_tokenizer(pre: str) -> dict[str, Any]:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in _PRE_GPT2:
        return byte_level
    if pre in _PRE_DIGITS_GPT2:
        # llama.cpp: "\p{N}" isolated first, then the GPT-2 regex (HF: Digits(individual) + ByteLevel)
        return {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        }
    split = _LLAMA3_SPLIT if pre in _PRE_LLAMA3 else _QWEN2_SPLIT if pre in _PRE_QWEN2 else None
    if split is None:
        log.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 split regex", pre)
        return byte_level
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False),
        ],
    }


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def tokenizer_json_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """The `tokenizers` JSON (as a dict) for a gpt2-style (byte-level BPE) GGUF vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GgufError(f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    merges: list[str] | None = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GgufError("GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise GgufError("tokenizer.ggml.token_type length differs from tokenizer.ggml.tokens")

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    for i, (tok, ttype) in enumerate(zip(tokens, token_types, strict=True)):
        # Added tokens are stored as raw text; the BPE vocabulary needs every key in the byte alphabet.
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        if key in vocab:
            log.warning("duplicate GGUF token %r at ids %d and %d; keeping the first", tok, vocab[key], i)
        else:
            vocab[key] = i
        if ttype == TOKEN_TYPE_CONTROL:
            added.append(_added_token(i, tok, special=True))
        elif ttype == TOKEN_TYPE_USER_DEFINED:
            added.append(_added_token(i, tok, special=False))

    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise GgufError(f"malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append([left, right])

    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    post: dict[str, Any] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": False,
        "use_regex": True,
    }
    if add_bos and bos_id is not None and 0 <= int(bos_id) < len(tokens):
        bos = tokens[int(bos_id)]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [int(bos_id)], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _byte_level_pre_tokenizer(pre),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in _PRE_LLAMA3,
            "vocab": vocab,
            "merges": pairs,
        },
    }


def tokenizer_json_bytes_from_gguf(meta: dict[str, Any]) -> bytes:
    """Deterministic serialisation, so the same GGUF always yields the same tokenizer checksum."""
    data = json.dumps(tokenizer_json_from_gguf(meta), ensure_ascii=False, separators=(",", ":"))
    return data.encode("utf-8")
