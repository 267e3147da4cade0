"""Option strings as people type them: LoRA lists, model names, the console's `name: value` lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.errors import RequestInvalid
from bot.core.requests.names import lora_suggestions, resolve_name
from bot.core.requests.options import IMAGINE_OPTIONS, LoraSpec, parse_loras, parse_options
from engine.errors import ModelNotFound

LORAS = ["tiny-lora-a.safetensors", "tiny-lora-b.safetensors", "styles/Film_Grain.safetensors"]


def test_loras_take_one_strength_for_both_or_unet_then_clip() -> None:
    assert parse_loras("tiny-lora-a:0.8, tiny-lora-b:0.5:0.25, plain") == (
        LoraSpec("tiny-lora-a", 0.8, 0.8), LoraSpec("tiny-lora-b", 0.5, 0.25), LoraSpec("plain", 1.0, 1.0))
    assert parse_loras(None) == () and parse_loras(" , ") == ()


@pytest.mark.parametrize(("text", "words"), [
    ("detail:lots", "is not a strength; write name:0.8"),
    ("detail:0.5:0.5:0.5", "at most two (UNet, then CLIP)"),
    (":0.5", "has no name"),
    ("detail:250", "outside -100..100"),
])
def test_a_lora_list_that_cannot_be_read_says_how_to_write_it(text: str, words: str) -> None:
    with pytest.raises(RequestInvalid, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_loras(text)


def test_names_resolve_with_or_without_extension_and_case_and_suggest_the_closest() -> None:
    assert resolve_name("LoRA", "tiny-lora-a", LORAS, "models/loras") == "tiny-lora-a.safetensors"
    assert resolve_name("LoRA", "film_grain", LORAS, "models/loras") == "styles/Film_Grain.safetensors"
    with pytest.raises(ModelNotFound, match="LoRA 'tiny-lora-c' is not in models/loras; closest: 'tiny-lora-"):
        resolve_name("LoRA", "tiny-lora-c", LORAS, "models/loras")


def test_lora_autocomplete_keeps_what_was_typed_before_the_last_entry() -> None:
    assert lora_suggestions("tiny-lora-a:0.7, film", LORAS) == ["tiny-lora-a:0.7, styles/Film_Grain:1.0"]
    assert lora_suggestions("tiny-lora-b:0.3", LORAS) == ["tiny-lora-b:0.3"]


def test_console_lines_split_at_known_option_names() -> None:
    assert parse_options("prompt: a red fox, (snow:1.2) seed: 42 steps:8 loras: tiny-lora-a:0.5") == {
        "prompt": "a red fox, (snow:1.2)", "seed": "42", "steps": "8", "loras": "tiny-lora-a:0.5"}
    assert parse_options("a red fox cfg: 6.5") == {"prompt": "a red fox", "cfg": "6.5"}
    with pytest.raises(RequestInvalid, match="seed: is given twice"):
        parse_options("prompt: fox seed: 1 seed: 2")


_VALUE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30).map(str.strip).filter(
    lambda v: v and not any(f"{name}:" in f" {v}" for name in IMAGINE_OPTIONS))


@given(st.dictionaries(st.sampled_from(IMAGINE_OPTIONS), _VALUE, max_size=6))
def test_options_written_as_a_line_read_back_the_same(options: dict[str, str]) -> None:
    line = " ".join(f"{name}: {value}" for name, value in options.items())
    assert parse_options(line) == options


@given(st.text(max_size=200))
def test_any_line_parses_or_says_what_is_wrong(text: str) -> None:
    try:
        parsed = parse_options(text)
    except RequestInvalid as err:
        assert "given twice" in str(err)
    else:
        assert set(parsed) <= set(IMAGINE_OPTIONS)
