"""Prompts a hostile member would type (issue 12, point 17): each is refused with a message naming what is wrong,
never an OSError with the server's path, never a weight that turns the conditioning into inf/NaN."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTextModel, CLIPTokenizer

from prompts import PromptError, encode_prompt, parse_weighted, resolve_wildcards, sd1_encoder
from prompts.emphasis import MAX_NESTING, MAX_WEIGHT
from prompts.wildcards import DEFAULT_WILDCARDS, MAX_NAME_CHARS


@pytest.mark.parametrize(("text", "message"), [
    ("(fox:1e39)", "emphasis weight 1e39 on 'fox' is outside -100 to 100, the range this bot allows; weights of 0.5 "
                   "to 1.5 are usual: write it like (fox:1.2)"),
    ("(fox:-1e3)", "emphasis weight -1e3 on 'fox' is outside -100 to 100"),
    ("(fox:" + "1" + "0" * 39 + ")", "emphasis weight 100000000000… (40 characters) on 'fox' is outside -100 to 100"),
    ("(" * 1000 + "fox", "brackets nest 1000 deep here; at most 64 ( and [ may be open at once (each ( multiplies "
                         "the weight by 1.1): close them, or write one weight, as in (word:1.5)"),
    ("(" * 49 + "fox", "the brackets around 'fox' multiply its weight to 106.7, outside -100 to 100, the range this "
                       "bot allows: use fewer brackets, or write one weight, as in (fox:1.5)"),
    ("(((fox:90)))", "the brackets around 'fox' multiply its weight to 108.9, outside -100 to 100"),
])
def test_weights_past_the_range_are_refused_naming_the_weight(text: str, message: str) -> None:
    with pytest.raises(PromptError) as caught:
        parse_weighted(text)
    assert str(caught.value).startswith(message)


def test_the_range_itself_is_allowed_and_exponents_are_weights() -> None:
    assert [(f.text, f.weight) for f in parse_weighted("(fox:1e2) (owl:-100)")] == [("fox", 100.0), (" ", 1.0),
                                                                                    ("owl", -100.0)]
    assert parse_weighted("(fox:2.5e-1)")[0].weight == 0.25
    assert parse_weighted("(" * 48 + "fox")[0].weight == pytest.approx(1.1 ** 48)  # 97.0: the deepest ( allowed
    assert parse_weighted("[" * MAX_NESTING + "fox")[0].weight == pytest.approx(1.1 ** -MAX_NESTING)
    assert [f.text for f in parse_weighted("(fox:1e39x)")] == ["fox:1e39x"]  # not a number: text, as before


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="()[]:.e-+19 fox\\", max_size=300))
def test_any_bracket_soup_gives_weights_in_range_or_a_message(text: str) -> None:
    try:
        fragments = parse_weighted(text)
    except PromptError as err:
        assert str(err)
        return
    assert all(math.isfinite(f.weight) and abs(f.weight) <= MAX_WEIGHT for f in fragments)


def test_the_extreme_allowed_weights_encode_to_finite_conditioning(tokenizer: CLIPTokenizer,
                                                                   sd1_model: CLIPTextModel) -> None:
    encoder = sd1_encoder(tokenizer, sd1_model)
    for weighting in ("comfy", "a1111"):
        for text in ("(fox:100) (owl:-100)", "(" * 48 + "fox", "[" * MAX_NESTING + "fox"):
            encoded = encode_prompt(text, [encoder], weighting=weighting)
            assert torch.isfinite(encoded.embeds).all(), (weighting, text[:20])


def test_a_300_letter_wildcard_is_refused_before_the_filesystem() -> None:
    with pytest.raises(PromptError) as caught:
        resolve_wildcards("a __" + "a" * 300 + "__ fox", 1)
    text = str(caught.value)
    assert text == ("wildcard __aaaaaaaaaaaaaaaaaaaa…__ has a 300-character name; wildcard names are at most 100 "
                    "letters, digits, _ and - (with / between folders): available: __animals__, __colors__")
    assert str(DEFAULT_WILDCARDS.parent) not in text and "File name too long" not in text


def test_names_up_to_the_limit_are_looked_up_and_found(tmp_path: Path) -> None:
    longest = "b" * MAX_NAME_CHARS
    with pytest.raises(PromptError, match=rf"wildcard __{longest}__ is not in wildcards/ \(available:"):
        resolve_wildcards(f"__{longest}__", 1)
    (tmp_path / "deep").mkdir()
    name = "deep/" + "c" * (MAX_NAME_CHARS - len("deep/"))
    (tmp_path / f"{name}.txt").write_text("a heron\n", encoding="utf-8")
    assert resolve_wildcards(f"__{name}__ at dawn", 1, tmp_path) == "a heron at dawn"


def test_a_wildcard_that_cannot_be_looked_up_names_no_path(tmp_path: Path) -> None:
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")  # a link to itself: ELOOP on every stat
    with pytest.raises(PromptError) as caught:
        resolve_wildcards("__loop__", 1, tmp_path)
    assert str(caught.value).startswith("wildcard __loop__ cannot be looked up (")
    assert str(tmp_path) not in str(caught.value)


def test_a_long_run_of_spaces_or_of_weighted_groups_parses_in_linear_time() -> None:
    """BREAK's `\\s*` rescanned the rest of a space run from each space (256 KiB of spaces: 16 minutes), and every
    `(x:w)` joined its group's text for a message it seldom needed (20,000 nested groups: 5 s). Both are now
    linear; 20,000 doublings of either would take minutes if they were not."""
    import time

    start = time.perf_counter()
    [spaced] = parse_weighted("a" + " " * 262_144 + "b")
    assert spaced.text == "a" + " " * 262_144 + "b" and spaced.weight == 1.0
    with pytest.raises(PromptError, match="nest 20000 deep"):
        parse_weighted("(a" * 20_000 + ":1)" * 20_000)
    assert time.perf_counter() - start < 20  # quadratic, this was over 900 s; linear, well under a second
    assert [f.text for f in parse_weighted("a  BREAK  b")] == ["a", "BREAK", "b"]


@pytest.mark.parametrize(("text", "drawn"), [
    ("__colors__-__animals__", "yellow-blue parrot"),
    ("__colors____animals__", "yellowblue parrot"),
    ("__colors__and__animals__", "yellowandblue parrot"),
])
def test_wildcards_side_by_side_are_each_their_own(text: str, drawn: str) -> None:
    """The name ran on to the last `__`: '__colors__-__animals__' was one wildcard that is not there."""
    assert resolve_wildcards(text, 3) == drawn
    assert resolve_wildcards("__colors__ __animals__", 3) == "yellow blue parrot"  # the same draws, spaced


def test_a_lora_tag_strength_is_held_to_loraloaders_range_and_may_have_an_exponent() -> None:
    from prompts.loras import extract_lora_tags

    with pytest.raises(PromptError, match=r"strength '1000' is outside -100 to 100"):
        extract_lora_tags("a fox <lora:x:1000>")  # it reached the graph, refused there for a node 'lora1'
    assert extract_lora_tags("<lora:x:1e-1>")[1][0].unet_weight == pytest.approx(0.1)


def test_a_lone_surrogate_is_a_prompt_error_not_the_tokenizers_type_error() -> None:
    from prompts.plan import token_report

    with pytest.raises(PromptError, match="lone UTF-16 surrogate"):
        token_report("a red \ud800 fox")
