"""Templates: a request's prompt expanded (wildcards, <lora:> tags) and turned into a graph that runs."""

from __future__ import annotations

import pytest

from engine.errors import ModelNotFound
from engine.executor import Executor
from engine.templates import LoraChoice, WorkflowParams, build_workflow, expand_prompt

LORAS = ["tiny-lora-a.safetensors", "tiny-lora-b.safetensors"]


def test_lora_tags_become_lora_choices_and_leave_the_text() -> None:
    expanded = expand_prompt("a fox, <lora:tiny-lora-a:0.8> in snow <lora:tiny-lora-b.safetensors:0.5:0.2>",
                             "", 1, LORAS)
    assert expanded.prompt == "a fox, in snow"
    assert expanded.loras == (LoraChoice("tiny-lora-a.safetensors", 0.8, 0.8),
                              LoraChoice("tiny-lora-b.safetensors", 0.5, 0.2))


def test_an_unknown_lora_tag_names_the_closest_files() -> None:
    with pytest.raises(ModelNotFound, match="tiny-lora-a.safetensors"):
        expand_prompt("a fox <lora:tiny-lora-aa:1>", "", 1, LORAS)


def test_wildcards_follow_the_seed_and_the_resolved_text_is_what_is_kept() -> None:
    picks = {expand_prompt("a {red|green|blue|white} fox", "", seed, []).prompt for seed in range(40)}
    assert len(picks) > 1
    assert expand_prompt("a {red|green} fox", "", 7, []) == expand_prompt("a {red|green} fox", "", 7, [])
    assert "{" not in expand_prompt("a {red|green} fox", "", 7, []).prompt


def test_an_expanded_prompt_runs_with_its_loras(executor: Executor) -> None:
    expanded = expand_prompt("a fox <lora:tiny-lora-a:0.7>", "", 3, executor.models.choices("loras"))
    graph = build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt=expanded.prompt,
                                          loras=expanded.loras, steps=2, width=64, height=64))
    assert graph["lora1"]["inputs"]["lora_name"] == "tiny-lora-a.safetensors"
    result = executor.run(graph)
    assert result.meta["models"]["loras"]["tiny-lora-a.safetensors"]["strength_model"] == 0.7
