"""CLIPSetLastLayer everywhere: SD1.x, SD2.x and SDXL encoders at ComfyUI 0.3.64's layers (set_clip_options), through
LoRAs, CLIP merges and the /imagine template's clip skip."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from engine.executor import Executor
from engine.templates import LoraChoice, WorkflowParams, build_workflow
from prompts.encode import _text_model
from tests.engine.conftest import txt2img

TEXT = "a red fox in the snow"


def encoded(executor: Executor, checkpoint: str, *nodes: tuple[str, str, dict[str, Any]]) -> torch.Tensor:
    """The embeds CLIPTextEncode "6" gives with `nodes` (id, class_type, inputs) between the loader and it; the
    last of them feeds the encode."""
    workflow = copy.deepcopy(txt2img(checkpoint=checkpoint))
    workflow["6"]["inputs"]["text"] = TEXT
    for node_id, class_type, inputs in nodes:
        workflow[node_id] = {"class_type": class_type, "inputs": inputs}
    if nodes:
        workflow["6"]["inputs"]["clip"] = [nodes[-1][0], 1 if nodes[-1][1] == "LoraLoader" else 0]
    run = executor.begin(workflow)
    wanted = {"4", "6", *(node_id for node_id, _, _ in nodes)}
    for node_id in run.prompt.order:  # the encode and what feeds it, in run order
        if node_id in wanted:
            run.compute(node_id)
    return run.values["6"][0].items[0].embeds


def hidden(model: torch.nn.Module, ids: list[int], stop: int, norm: bool) -> torch.Tensor:
    """ComfyUI's SDClipModel output for `stop`: past the depth "last" (final-normed), else that hidden layer."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    if abs(stop) > model.config.num_hidden_layers:
        return out.last_hidden_state
    z = out.hidden_states[stop]
    return _text_model(model).final_layer_norm(z) if norm else z


def token_ids(tokenizer: Any, pad: int) -> list[int]:
    ids = tokenizer(TEXT).input_ids
    return ids + [pad] * (77 - len(ids))


def clip_layer(stop: int) -> tuple[str, str, dict[str, Any]]:
    return ("10", "CLIPSetLastLayer", {"clip": ["4", 1], "stop_at_clip_layer": stop})


@pytest.mark.parametrize("stop", [-1, -2, -3, -4, -24])
def test_sd15_layers_are_comfys_and_past_the_depth_is_the_last_layer(executor: Executor, stop: int) -> None:
    got = encoded(executor, "tiny-sd15.safetensors", clip_layer(stop))[0]  # first: see the SDXL test
    pipe = executor.models.checkpoint("tiny-sd15.safetensors").pipe
    expected = hidden(pipe.text_encoder, token_ids(pipe.tokenizer, 49407), stop, norm=True)
    assert torch.allclose(got, expected[0], atol=1e-5)


@pytest.mark.parametrize("stop", [-1, -2, -3, -4, -10, -11, -24])
def test_sdxl_sets_both_encoders_each_within_its_own_depth(executor: Executor, stop: int) -> None:
    # encode first: it leaves the text encoders with exactly this CLIP's LoRAs (none) active, whatever an earlier
    # test left on the shared checkpoint, so the direct calls below read the bare encoders too
    got = encoded(executor, "tiny-sdxl.safetensors", clip_layer(stop))[0]
    pipe = executor.models.checkpoint("tiny-sdxl.safetensors").pipe
    clip_l = hidden(pipe.text_encoder, token_ids(pipe.tokenizer, 49407), stop, norm=False)
    clip_g = hidden(pipe.text_encoder_2, token_ids(pipe.tokenizer_2, 0), stop, norm=False)
    assert torch.allclose(got, torch.cat([clip_l, clip_g], dim=-1)[0], atol=1e-5)


@pytest.mark.parametrize("stop", [-2, -3, -24])
def test_sd2_layers_count_the_block_the_file_has_and_diffusers_leaves_out(executor: Executor, stop: int) -> None:
    got = encoded(executor, "tiny-sd2-v.safetensors", clip_layer(stop))[0]  # first: see the SDXL test
    pipe = executor.models.checkpoint("tiny-sd2-v.safetensors").pipe
    with torch.no_grad():
        out = pipe.text_encoder(input_ids=torch.tensor([token_ids(pipe.tokenizer, 0)]), output_hidden_states=True)
    expected = _text_model(pipe.text_encoder).final_layer_norm(out.hidden_states[stop + 1])  # ComfyUI's -k of 24
    assert torch.allclose(got, expected[0], atol=1e-5)


def test_a_lora_keeps_the_layer_either_side_of_it(executor: Executor) -> None:
    lora = {"model": ["4", 0], "lora_name": "tiny-lora-a.safetensors", "strength_model": 1.0, "strength_clip": 1.0}
    before = encoded(executor, "tiny-sd15.safetensors", clip_layer(-2),
                     ("11", "LoraLoader", {**lora, "clip": ["10", 0]}))
    after = encoded(executor, "tiny-sd15.safetensors", ("11", "LoraLoader", {**lora, "clip": ["4", 1]}),
                    ("10", "CLIPSetLastLayer", {"clip": ["11", 1], "stop_at_clip_layer": -2}))
    lora_only = encoded(executor, "tiny-sd15.safetensors", ("11", "LoraLoader", {**lora, "clip": ["4", 1]}))
    assert torch.allclose(before, after, atol=1e-6) and not torch.allclose(before, lora_only, atol=1e-4)


@pytest.mark.parametrize("merge", ["CLIPMergeSimple", "CLIPMergeAdd", "CLIPMergeSubtract"])
def test_a_merged_clip_keeps_clip1s_layer_and_takes_a_new_one(executor: Executor, merge: str) -> None:
    extra = {"CLIPMergeSimple": {"ratio": 1.0}, "CLIPMergeSubtract": {"multiplier": 1.0}}.get(merge, {})
    other = ("12", "CheckpointLoaderSimple", {"ckpt_name": "tiny-sd15-b.safetensors"})
    inputs = {"clip1": ["10", 0], "clip2": ["12", 1], **extra}
    kept = encoded(executor, "tiny-sd15.safetensors", other, clip_layer(-2), ("13", merge, inputs))
    plain_merge = encoded(executor, "tiny-sd15.safetensors", other, ("13", merge, {**inputs, "clip1": ["4", 1]}))
    reset = encoded(executor, "tiny-sd15.safetensors", other, ("13", merge, {**inputs, "clip1": ["4", 1]}),
                    ("14", "CLIPSetLastLayer", {"clip": ["13", 0], "stop_at_clip_layer": -2}))
    assert torch.allclose(kept, reset, atol=1e-6)
    if merge != "CLIPMergeSubtract":  # a difference of two SD1.x CLIPs has final-norm weights 1 - 1: all zeros
        assert not torch.allclose(kept, plain_merge, atol=1e-4)


def test_imagines_clip_skip_sets_the_layer_after_the_loras_for_both_prompts() -> None:
    graph = build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="fox", negative="", seed=1,
                                          steps=4, cfg=7.0, width=64, height=64, clip_skip=-2,
                                          loras=(LoraChoice("tiny-lora-a.safetensors", 1.0, 1.0),)))
    assert graph["10"] == {"class_type": "CLIPSetLastLayer",
                           "inputs": {"clip": ["lora1", 1], "stop_at_clip_layer": -2}}
    assert graph["6"]["inputs"]["clip"] == graph["7"]["inputs"]["clip"] == ["10", 0]
