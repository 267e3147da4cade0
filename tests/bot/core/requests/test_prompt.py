"""Prompt expansion: style, then wildcards with the seed, then <lora:> tags, one case rule for every name."""

from __future__ import annotations

import pytest

from bot.core.requests.names import resolve_name
from bot.core.requests.prompt import expand_prompt
from engine.errors import ModelNotFound
from engine.templates import LoraChoice
from prompts.errors import PromptError

LORAS = ["tiny-lora-a.safetensors", "tiny-lora-b.safetensors"]


def test_lora_tags_become_lora_choices_and_leave_the_text() -> None:
    expanded = expand_prompt("a fox, <lora:tiny-lora-a:0.8> in snow <lora:tiny-lora-b.safetensors:0.5:0.2>",
                             "", seed=1, available_loras=LORAS)
    assert expanded.prompt == "a fox, in snow"
    assert expanded.loras == (LoraChoice("tiny-lora-a.safetensors", 0.8, 0.8),
                              LoraChoice("tiny-lora-b.safetensors", 0.5, 0.2))


def test_tags_come_after_the_chosen_loras() -> None:
    chosen = (LoraChoice("tiny-lora-b.safetensors", 0.3, 0.3),)
    expanded = expand_prompt("a fox <lora:tiny-lora-a:1>", "", seed=1, available_loras=LORAS, loras=chosen)
    assert [lora.name for lora in expanded.loras] == ["tiny-lora-b.safetensors", "tiny-lora-a.safetensors"]


def test_an_unknown_lora_tag_names_the_closest_files() -> None:
    with pytest.raises(ModelNotFound, match="tiny-lora-a.safetensors"):
        expand_prompt("a fox <lora:tiny-lora-aa:1>", "", seed=1, available_loras=LORAS)


def test_a_tag_and_the_loras_option_resolve_a_name_by_the_same_case_rule() -> None:
    available = ["Detail.safetensors", "other.safetensors"]
    for typed in ("Detail", "detail", "DETAIL", "Detail.safetensors"):
        tagged = expand_prompt(f"a fox <lora:{typed}:1>", "", seed=1, available_loras=available)
        assert tagged.loras[0].name == resolve_name("LoRA", typed, available, "models/loras") == "Detail.safetensors"


def test_wildcards_follow_the_seed_and_the_resolved_text_is_what_is_kept() -> None:
    picks = {expand_prompt("a {red|green|blue|white} fox", "", seed=seed, available_loras=[]).prompt
             for seed in range(40)}
    assert len(picks) > 1
    once = expand_prompt("a {red|green} fox", "", seed=7, available_loras=[])
    assert once == expand_prompt("a {red|green} fox", "", seed=7, available_loras=[])
    assert "{" not in once.prompt


def test_the_style_is_applied_first_so_its_wildcards_and_tags_expand_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.core.requests.prompt as prompt_module

    def style(name: str, prompt: str, negative: str) -> tuple[str, str]:
        assert name == "fancy" and "{" not in negative
        return f"{prompt}, {{oil|ink}} painting <lora:tiny-lora-b:0.5>", f"{negative}, {{blurry|noisy}}".strip(", ")

    monkeypatch.setattr(prompt_module, "apply_style", style)
    expanded = expand_prompt("a fox", "", seed=3, available_loras=LORAS, style="fancy")
    assert "{" not in expanded.prompt and "{" not in expanded.negative and "<lora" not in expanded.prompt
    assert expanded.prompt.startswith("a fox, ") and expanded.prompt.endswith(" painting")
    assert expanded.loras == (LoraChoice("tiny-lora-b.safetensors", 0.5, 0.5),)


def test_an_unknown_style_is_a_prompt_error() -> None:
    with pytest.raises(PromptError, match="not defined"):
        expand_prompt("a fox", "", seed=1, available_loras=[], style="no-such-style")
