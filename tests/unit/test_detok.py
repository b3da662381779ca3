"""Incremental detokenisation: streamed pieces join to the full decode, never split a character,
and stop strings cut the text even when they span tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.models import default_model_path
from dynamo_grpc.tokens.detok import IncrementalDetokenizer
from dynamo_grpc.tokens.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.from_model_source(default_model_path())
    t.ascii_pieces()  # built, as the frontend does in a thread once a model is served
    return t


def stream(d: IncrementalDetokenizer, ids: list[int], step: int = 1) -> list[str]:
    pieces = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(d.flush())
    return pieces


TEXTS = [
    "Hello, world! How are you today?",
    "emoji 😀🎉👩\u200d👩\u200d👧 and flags 🇯🇵🇫🇷",
    "日本語のテキストと中文和한국어",
    "def f(x):\n    return x ** 2\n\n",
    "mixed ½ ² 42 𝔘𝔫𝔦 done",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_stream_joins_to_decode(tok: Tokenizer, text: str, step: int) -> None:
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    pieces = stream(d, ids, step)
    assert "".join(pieces) == text == d.output_text
    assert not any("\ufffd" in p for p in pieces)
    assert d.num_generated == len(ids)
    assert not d.stopped


def test_multibyte_characters_are_split_across_tokens(tok: Tokenizer) -> None:
    """Precondition for the tests above to mean something: some tokens hold partial characters."""
    ids = tok.encode("😀 日本")
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)
    d = IncrementalDetokenizer(tok)
    first = d.add(ids[:1])
    assert first == ""  # first bytes of 😀 alone: nothing final yet
    assert "".join([first, *(d.add([i]) for i in ids[1:]), d.flush()]) == "😀 日本"


def test_flush_emits_unfinished_character_as_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    d = IncrementalDetokenizer(tok)
    out = d.add(ids[:-1])
    assert "\ufffd" not in out
    assert out + d.flush() == tok.decode(ids[:-1])
    assert d.flush() == ""


def test_prompt_context_is_not_emitted(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>user\nSay hi 日<|im_end|>\n<|im_start|>assistant\n")
    gen = tok.encode("Hi there 😀")
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(stream(d, gen)) == "Hi there 😀"
    assert d.num_generated == len(gen)


def test_prompt_ending_mid_character(tok: Tokenizer) -> None:
    ids = tok.encode("日本語")
    d = IncrementalDetokenizer(tok, prompt_ids=ids[:1])
    assert "".join(stream(d, ids[1:])) == tok.decode(ids)[len(tok.decode(ids[:1])) :]


def test_special_tokens(tok: Tokenizer) -> None:
    ids = [*tok.encode("Hello"), 2]
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == "Hello"
    assert "".join(stream(IncrementalDetokenizer(tok, skip_special_tokens=False), ids)) == "Hello<|im_end|>"


def test_stop_string_spanning_tokens(tok: Tokenizer) -> None:
    text = "The answer is forty-two. END OF ANSWER and more text"
    ids = tok.encode(text)
    stop = "two. END"
    # The stop string must really span several tokens for this test to mean anything.
    assert all(stop not in tok.decode([i]) for i in ids)
    d = IncrementalDetokenizer(tok, stop=[stop])
    pieces = stream(d, ids)
    assert "".join(pieces) == "The answer is forty-"
    assert d.stopped and d.stop_reason == stop
    assert d.add(tok.encode(" ignored")) == "" and d.flush() == ""


def test_stop_string_is_held_back_until_resolved(tok: Tokenizer) -> None:
    ids = tok.encode("hello world war")
    d = IncrementalDetokenizer(tok, stop=["world peace"])
    seen = ""
    checked = False
    for n, i in enumerate(ids, start=1):
        seen += d.add([i])
        if tok.decode(ids[:n]) == "hello world":
            assert seen == "hello "  # "world" could still become "world peace"
            checked = True
    assert checked
    seen += d.flush()
    assert seen == "hello world war" and not d.stopped


def test_partial_stop_released_at_flush(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["STOP NOW"])
    out = "".join(stream(d, tok.encode("wait STOP")))
    assert out == "wait STOP" and not d.stopped


def test_include_stop_str(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["</answer>"], include_stop_str=True)
    assert "".join(stream(d, tok.encode("<answer>42</answer> trailing"))) == "<answer>42</answer>"
    assert d.stop_reason == "</answer>"


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["gamma", "beta", "alpha beta"])
    assert "".join(stream(d, tok.encode("x alpha beta gamma"))) == "x "
    assert d.stop_reason == "alpha beta"


def test_stop_on_emoji_split_over_tokens(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["🎉"])
    assert "".join(stream(d, tok.encode("party 🎉 time"))) == "party "
    assert d.stopped


def test_stop_in_first_token_and_in_one_add(tok: Tokenizer) -> None:
    d = IncrementalDetokenizer(tok, stop=["Hello"])
    assert d.add(tok.encode("Hello world")) == ""
    assert d.stopped and d.output_text == ""


def test_invalid_stop_strings(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, stop=[""])
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, stop=[None])  # type: ignore[list-item]


_TEXT = st.lists(st.sampled_from([*"ab cd\n,.!", "é", "日", "😀", "🎉", "ß", "ab", "  "]), max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    text=_TEXT, stop=st.text(alphabet=st.sampled_from(list("ab c😀日")), min_size=1, max_size=4), step=st.integers(1, 4)
)
def test_stop_property(tok: Tokenizer, text: str, stop: str, step: int) -> None:
    """Whatever the chunking, the output is the decoded text cut at the first stop occurrence."""
    ids = tok.encode(text)
    full = tok.decode(ids)
    d = IncrementalDetokenizer(tok, stop=[stop])
    pieces = stream(d, ids, step)
    out = "".join(pieces)
    pos = full.find(stop)
    if pos >= 0:
        assert out == full[:pos] and d.stopped
    else:
        assert out == full and not d.stopped
    assert not any("\ufffd" in p for p in pieces)


class _DecoderOnly:
    """The same tokenizer without `ascii_pieces`: every piece goes through the decoder (the reference)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.decode = tok.decode


def test_ascii_pieces_are_the_decoders_own_text(tok: Tokenizer) -> None:
    pieces = tok.ascii_pieces()
    assert pieces is not None and tok.ascii_table is pieces
    assert len(pieces) > tok.vocab_size // 2  # byte-level BPE: most tokens are ASCII
    for i in [*list(pieces)[:300], *list(pieces)[-300:]]:
        assert tok.decode([i]) == pieces[i] and pieces[i].isascii()
    assert not set(pieces) & tok.special_token_ids


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from([*TEXTS, " plain ascii", "🦊", "über", "\n\n"]), min_size=1, max_size=6),
    extra=st.lists(st.integers(0, 49151), max_size=4),
    step=st.integers(1, 4),
    skip=st.booleans(),
)
def test_ascii_fast_path_streams_what_the_decoder_streams(
    tok: Tokenizer, parts: list[str], extra: list[int], step: int, skip: bool
) -> None:
    """Runs of ASCII tokens skip the decoder; the pieces released, one by one, are exactly the decoder's,
    across multi-byte characters, special tokens (kept or skipped) and arbitrary ids."""
    ids = tok.encode("".join(parts)) + [i for i in extra if i < tok.vocab_size]
    fast = stream(IncrementalDetokenizer(tok, [1, 2, 3], skip_special_tokens=skip), ids, step)
    slow = stream(IncrementalDetokenizer(_DecoderOnly(tok), [1, 2, 3], skip_special_tokens=skip), ids, step)
    assert fast == slow
