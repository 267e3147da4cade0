"""The recipe read off a workflow: the walk up from a node, and token usage as the PNG and the cards show it."""

from __future__ import annotations

from typing import Any

from engine.recipe import upstream, usage_text

# a sampler fed through a LoRA, with the positive prompt behind a CLIPSetLastLayer; node 99 is absent
PROMPT: dict[str, Any] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "a"}},
    "11": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 1], "stop_at_clip_layer": -2}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "a fox"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["99", 0], "text": "blurry"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["6", 0], "negative": ["7", 0]}},
}


def test_upstream_walks_one_input_nearest_first_and_skips_absent_nodes() -> None:
    assert [node_id for node_id, _ in upstream(PROMPT, "3", "model")] == ["10", "4"]
    assert [node_id for node_id, _ in upstream(PROMPT, "3")] == ["10", "6", "7", "4", "11"]
    assert list(upstream(PROMPT, "4")) == [] and list(upstream(PROMPT, "nope")) == []


def test_usage_text_counts_chunks_of_75_with_notes_only_when_asked() -> None:
    tokens = {"6": {"tokens": 130, "chunks": 2}, "7": {"tokens": 700, "chunks": 8, "truncated": 100}}
    assert usage_text(tokens, "6", "7") == "prompt 130/150 (2 chunks) · negative 700/600 (8 chunks, 100 cut)"
    assert usage_text(tokens, "6", "7", separator=", ", notes=False) == "prompt 130/150, negative 700/600"
    sdxl = {"6": {"text_g": {"tokens": 5, "chunks": 1}, "text_l": {"tokens": 4, "chunks": 1}}}
    assert usage_text(sdxl, "6", None) == "prompt 5/75"  # SDXL: the bigger encoder's count
    assert usage_text(tokens, None, "absent") is None
