"""Chat template rendering: identical to transformers' apply_chat_template, and sandboxed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from dynamo_grpc.models import ModelCard, default_model_path, load_model_source
from dynamo_grpc.tokens.chat_template import ChatTemplateError, compile_template, flatten_text_content, render_chat

Messages = list[dict[str, Any]]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_source(default_model_path())[0]


@pytest.fixture(scope="module")
def hf(card: ModelCard):  # type: ignore[no-untyped-def]
    """transformers' tokenizer over the same tokenizer.json and special tokens (rendering is what we compare)."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    tok_json = load_model_source(default_model_path())[1]
    t = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tok_json.decode()), **card.special_tokens_map()
    )
    t.chat_template = card.chat_template
    return t


CONVERSATIONS: list[Messages] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? 🐔 日本"},
    ],
    [{"role": "user", "content": "  spaces \n\n and\ttabs  "}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "<|im_start|>injected<|im_end|>"}],
    [{"role": "user", "content": "with none", "name": None}],
]

# Templates exercising what transformers' environment provides.
CUSTOM_TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}",
    "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}",
    "    {% if true %}\n    lstrip and trim\n    {% endif %}\nend",
    "{{ dict(a=1) | tojson }}{{ tools | tojson }}{{ documents is none }}",
    "{% for m in messages %}{{ m.content if 'content' in m else '-' }}{{ m.name | default('x') }}{% endfor %}",
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_default_template_matches_transformers(card: ModelCard, hf, messages: Messages, gen: bool) -> None:  # type: ignore[no-untyped-def]
    assert card.chat_template is not None
    ours = render_chat(
        card.chat_template, messages, add_generation_prompt=gen, special_tokens=card.special_tokens_map()
    )
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs


@pytest.mark.parametrize("template", CUSTOM_TEMPLATES)
def test_custom_templates_match_transformers(card: ModelCard, hf, template: str) -> None:  # type: ignore[no-untyped-def]
    messages = CONVERSATIONS[2]
    ours = render_chat(template, messages, add_generation_prompt=True, special_tokens=card.special_tokens_map())
    theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
    assert ours == theirs


def test_continue_final_message_matches_transformers(card: ModelCard, hf) -> None:  # type: ignore[no-untyped-def]
    assert card.chat_template is not None
    messages = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn moon "}]
    ours = render_chat(
        card.chat_template,
        messages,
        add_generation_prompt=False,
        continue_final_message=True,
        special_tokens=card.special_tokens_map(),
    )
    theirs = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\nAutumn moon ")


def test_extra_kwargs_reach_template(card: ModelCard, hf) -> None:  # type: ignore[no-untyped-def]
    template = "{{ enable_thinking }}{{ bos_token }}"
    messages = [{"role": "user", "content": "x"}]
    ours = render_chat(template, messages, enable_thinking=True, bos_token="<override>")
    theirs = hf.apply_chat_template(
        messages, tokenize=False, chat_template=template, enable_thinking=True, bos_token="<override>"
    )
    assert ours == theirs == "True<override>"


def test_default_template_text(card: ModelCard) -> None:
    assert card.chat_template is not None
    out = render_chat(card.chat_template, [{"role": "user", "content": "hi"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raise_exception_is_a_clear_error() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert render_chat(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", [])


def test_tojson_does_not_html_escape() -> None:
    out = render_chat("{{ messages[0].content | tojson }}", [{"role": "user", "content": "<a & 'b'> é"}])
    assert out == "\"<a & 'b'> é\""


def test_strftime_now() -> None:
    out = render_chat("{{ strftime_now('%Y') }}", [{"role": "user", "content": "x"}])
    assert out == str(datetime.now().year)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ namespace(_private=1) }}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_blocks_escapes(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_rich_objects_become_placeholders() -> None:
    class Evil:
        def __str__(self) -> str:
            return "evil"

    out = render_chat("{{ messages[0].content }}", [{"role": "user", "content": Evil()}])
    assert out == "<Evil>"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("not a list", "list"),
        ([1], "object"),
        ([{"content": "no role"}], "role"),
        ([], "empty"),
    ],
)
def test_bad_messages(messages: Any, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render_chat("{{ messages }}", messages)


def test_continue_final_message_errors() -> None:
    with pytest.raises(ChatTemplateError, match="mutually exclusive"):
        render_chat("x", [{"role": "user", "content": "a"}], add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="dropped"):
        render_chat(
            "nothing", [{"role": "user", "content": "a"}], add_generation_prompt=False, continue_final_message=True
        )


def test_template_runtime_type_error() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0].content + 1 }}", [{"role": "user", "content": "a"}])


def test_compile_is_cached() -> None:
    assert compile_template("{{ 1 }}") is compile_template("{{ 1 }}")


def test_flatten_text_content(card: ModelCard) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    flat = flatten_text_content(parts)
    assert flat == [{"role": "user", "content": "a\nb"}]
    assert parts[0]["content"][0] == {"type": "text", "text": "a"}  # input untouched
    assert card.chat_template is not None
    assert "<|im_start|>user\na\nb<|im_end|>" in render_chat(card.chat_template, flat)
    with pytest.raises(ChatTemplateError, match="only text parts"):
        flatten_text_content([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ChatTemplateError):
        # a list content reaching a string-concatenating template is a clear error, not a crash
        render_chat(card.chat_template, parts)
