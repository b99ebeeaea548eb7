"""Incremental detokenization and stop strings, on the tiny model's byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.engine.text import IncrementalDetokenizer, StopStringMatcher, token_bytes


@pytest.fixture(scope="module")
def tokenizer(tiny_model_a: Path):
    return AutoTokenizer.from_pretrained(tiny_model_a)


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "Grüße, 日本語 and ☃ snow 🙂!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces: many characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt:", add_special_tokens=False))
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_incomplete_character_at_the_end_is_flushed(tokenizer) -> None:
    ids = tokenizer.encode("日", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(ids[0]) == ""  # the first byte alone is no character yet
    assert detok.flush() == tokenizer.decode(ids[:1])


def test_stop_string_cuts_the_text_and_is_never_emitted() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.push("Hello S") == ("Hello ", False)  # "S" may start "STOP": held back
    assert matcher.push("T") == ("", False)
    assert matcher.push("OP and more") == ("", True)
    assert matcher.text == "Hello "


def test_held_back_prefix_is_released_when_it_turns_out_harmless() -> None:
    matcher = StopStringMatcher(("</end>", "###"))
    assert matcher.push("a </e") == ("a ", False)
    assert matcher.push("x ##") == ("</ex ", False)
    assert matcher.flush() == "##"
    assert matcher.text == "a </ex ##"


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(("world", "lo"))
    assert matcher.push("hello world") == ("hel", True)
    assert matcher.text == "hel"


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher(())
    assert matcher.push("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_token_bytes_are_each_tokens_own_even_inside_a_character(tokenizer) -> None:
    text = "héllo wörld €"
    ids = tokenizer(text)["input_ids"]
    pieces = [token_bytes(tokenizer, i, tokenizer.decode([i])) for i in ids]
    assert b"".join(bytes(p) for p in pieces) == text.encode()
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids), "some token holds part of a character"
