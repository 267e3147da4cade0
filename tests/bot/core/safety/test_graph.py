"""The rules read on graphs: every prompt box, every model file, and the enforced negative written into every
sampler's negative conditioning (Noodle's own templates and uploaded workflows), checked by the real validator
and, for the joined form, run on the tiny models."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bot.core.safety.graph import NegativeNotApplied, model_files, prompt_texts, with_negative
from engine.executor import Executor
from engine.templates import LoraChoice, WorkflowParams, build_workflow

ENFORCED = "ugly, watermark"


def _imagine(**extra: Any) -> dict[str, Any]:
    return build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a red fox", negative="blurry",
                                         steps=2, width=64, height=64, **extra))


def _texts(workflow: dict[str, Any]) -> dict[str, str]:
    return {f"{box.node_id}.{box.name}": box.text for box in prompt_texts(workflow)}


def test_noodles_own_graph_gets_the_negative_appended_once() -> None:
    graph = _imagine(loras=(LoraChoice("tiny-lora-a.safetensors", 0.8, 0.8),))
    enforced = with_negative(graph, ENFORCED)
    texts = sorted(_texts(enforced).values())
    assert texts == ["a red fox", "blurry, ugly, watermark"]
    assert with_negative(enforced, ENFORCED) == enforced  # a reroll of a changed graph is not changed again
    assert model_files(graph) == {"checkpoints": ["tiny-sd15.safetensors"], "loras": ["tiny-lora-a.safetensors"]}
    assert graph == _imagine(loras=(LoraChoice("tiny-lora-a.safetensors", 0.8, 0.8),))  # the input is not touched


def test_through_a_controlnet_apply_the_negative_encode_is_found() -> None:
    graph = _imagine(control_image="hint.png", controlnet="tiny-controlnet-sd15.safetensors")
    assert any(node["class_type"] == "ControlNetApplyAdvanced" for node in graph.values())
    assert sorted(_texts(with_negative(graph, ENFORCED)).values()) == ["a red fox", "blurry, ugly, watermark"]


def _shared_encode_workflow() -> dict[str, Any]:
    """One text encode feeding both the positive and the negative (a lazy graph people do publish)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "safety-graph"}},
    }


def test_a_shared_encode_keeps_its_positive_and_the_negative_is_joined_on(bot_executor: Executor) -> None:
    graph = _shared_encode_workflow()
    enforced = with_negative(graph, ENFORCED)
    assert enforced["2"]["inputs"]["text"] == "a lighthouse"  # the positive is untouched
    join = enforced["4"]["inputs"]["negative"][0]
    assert enforced[join]["class_type"] == "ConditioningConcat"
    assert enforced[join]["inputs"]["conditioning_to"] == ["2", 0]
    encode = enforced[join]["inputs"]["conditioning_from"][0]
    assert enforced[encode] == {"class_type": "CLIPTextEncode", "inputs": {"text": ENFORCED, "clip": ["1", 1]}}
    assert with_negative(enforced, ENFORCED) == enforced
    bot_executor.validate(enforced)
    result = bot_executor.run(enforced)  # the joined negative really runs
    assert encode in result.meta["tokens"]


def test_a_negative_made_without_text_is_joined_with_the_positives_clip() -> None:
    graph = _shared_encode_workflow()
    graph["7"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}}
    graph["4"]["inputs"]["negative"] = ["7", 0]
    enforced = with_negative(graph, ENFORCED)
    assert ENFORCED in _texts(enforced).values()
    lonely = copy.deepcopy(graph)  # no text encode reaches this sampler at all (a broken graph: the tracing ends)
    lonely["4"]["inputs"]["positive"] = ["7", 0]
    del lonely["2"]
    lonely["7"]["inputs"]["conditioning"] = ["7", 0]
    with pytest.raises(NegativeNotApplied, match="node 4 \\(KSampler\\)"):
        with_negative(lonely, ENFORCED)


def test_every_prompt_box_of_an_sdxl_encode_is_read() -> None:
    graph = {"1": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a castle", "text_l": "gothic"}},
             "2": {"class_type": "SomeCustomEncode", "inputs": {"text": "hidden words", "seed": 3}}}
    assert _texts(graph) == {"1.text_g": "a castle", "1.text_l": "gothic", "2.text": "hidden words"}
