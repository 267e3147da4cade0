"""Merge nodes on the tiny SD1.5 pair: Add/Subtract (model and CLIP), the block merges, chains, no reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import WorkflowInvalid
from engine.executor import Executor
from engine.models.lora import folded_state_dict
from engine.models.manager import ModelManager
from engine.nodes.merging import CLIPMergeAdd, CLIPMergeSubtract, ModelMergeAdd, ModelMergeSubtract
from engine.nodes.merging_blocks import ModelMergeSD1, ModelMergeSDXL
from engine.object_info import node_info
from engine.values import ClipRef, ModelRef
from tests.engine.test_runs import fresh_run, image_paths, pixels

A, B = "tiny-sd15.safetensors", "tiny-sd15-b.safetensors"


def model(manager: ModelManager, name: str) -> ModelRef:
    loaded = manager.checkpoint(name)
    return ModelRef(loaded, loaded.pipe, label=name)


def unet_weights(manager: ModelManager, ref: ModelRef) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in folded_state_dict(manager.use_unet(ref)).items()}


def clip_weights(manager: ModelManager, ref: ClipRef) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in folded_state_dict(manager.use_text_encoders(ref)[0]).items()}


def loaders() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": A}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": B}}}


def sampled(graph: dict, model_node: list, clip_node: list, prefix: str) -> dict:
    """`graph` plus a 3-step sampler on `model_node` with a prompt encoded by `clip_node`, saved by node "S"."""
    return {**graph,
            "P": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": clip_node}},
            "L": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "K": {"class_type": "KSampler", "inputs": {"model": model_node, "seed": 3, "steps": 3, "cfg": 5.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": ["P", 0], "negative": ["P", 0],
                                                      "latent_image": ["L", 0], "denoise": 1.0}},
            "D": {"class_type": "VAEDecode", "inputs": {"samples": ["K", 0], "vae": ["1", 2]}},
            "S": {"class_type": "SaveImage", "inputs": {"images": ["D", 0], "filename_prefix": prefix}}}


def node_values(executor: Executor, graph: dict) -> dict:
    """Every node's output values after running `graph` node by node; each MODEL or CLIP merge feeds a
    CheckpointSave so that the graph has outputs."""
    graph = dict(graph)
    for node_id, node in list(graph.items()):
        if node["class_type"].startswith(("ModelMerge", "CLIPMerge")):
            model, clip = (([node_id, 0], ["1", 1]) if node["class_type"].startswith("Model")
                           else (["1", 0], [node_id, 0]))
            graph[f"save{node_id}"] = {"class_type": "CheckpointSave", "inputs": {
                "model": model, "clip": clip, "vae": ["1", 2], "filename_prefix": f"checkpoints/m{node_id}"}}
    run = executor.begin(graph)
    for node_id in run.prompt.order:
        run.compute(node_id)
    return run.values


def render(executor: Executor, graph: dict) -> np.ndarray:
    return pixels(image_paths(executor, fresh_run(executor, graph)["outputs"], "S")[0])


def test_inputs_and_ranges_match_comfyui(executor: Executor) -> None:
    assert set(ModelMergeAdd.model_fields) == {"model1", "model2"}
    assert set(CLIPMergeAdd.model_fields) == {"clip1", "clip2"}
    for node in (ModelMergeSubtract, CLIPMergeSubtract):
        assert node.model_fields["multiplier"].default == 1.0
    graph = sampled({**loaders(),
                     "3": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                                                          "multiplier": 10.5}},
                     "4": {"class_type": "CLIPMergeSubtract", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1],
                                                                         "multiplier": -10.5}}},
                    ["3", 0], ["4", 0], "bad")
    with pytest.raises(WorkflowInvalid) as caught:
        executor.validate(graph)
    errors = {node: [e["type"] for e in found["errors"]] for node, found in caught.value.body["node_errors"].items()}
    assert errors == {"3": ["value_bigger_than_max"], "4": ["value_smaller_than_min"]}


def test_model_add_and_subtract_follow_comfyuis_add_patches(executor: Executor) -> None:
    """ComfyUI: add is add_patches(m2, 1, 1) = m1 + m2; subtract is add_patches(m2, -m, m) = m * m1 - m * m2."""
    manager = executor.models
    a, b = unet_weights(manager, model(manager, A)), unet_weights(manager, model(manager, B))
    graph = {**loaders(),
             "3": {"class_type": "ModelMergeAdd", "inputs": {"model1": ["1", 0], "model2": ["2", 0]}},
             "4": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                                                  "multiplier": 0.6}},
             "5": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["3", 0], "model2": ["2", 0],
                                                                  "multiplier": 1.0}}}
    values = node_values(executor, graph)
    added, subtracted, chained = (unet_weights(manager, values[n][0]) for n in ("3", "4", "5"))
    for key in a:
        torch.testing.assert_close(added[key], a[key] + b[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(subtracted[key], 0.6 * a[key] - 0.6 * b[key], rtol=1e-5, atol=1e-6)
        # patches compose: (a + b) - b is a again
        torch.testing.assert_close(chained[key], a[key], rtol=1e-5, atol=1e-5)


def test_clip_add_and_subtract_leave_position_ids_alone(executor: Executor) -> None:
    manager = executor.models
    a, b = (clip_weights(manager, ClipRef(ref.checkpoint, ref.pipe)) for ref in (model(manager, A), model(manager, B)))
    graph = {**loaders(),
             "3": {"class_type": "CLIPMergeAdd", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1]}},
             "4": {"class_type": "CLIPMergeSubtract", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1],
                                                                 "multiplier": -2.5}}}
    values = node_values(executor, graph)
    added, subtracted = (clip_weights(manager, values[n][0]) for n in ("3", "4"))
    kept = [k for k in a if k.endswith((".position_ids", ".logit_scale"))]
    for key in a:
        if key in kept:
            assert torch.equal(added[key], a[key]) and torch.equal(subtracted[key], a[key])
            continue
        torch.testing.assert_close(added[key], a[key] + b[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(subtracted[key], -2.5 * a[key] + 2.5 * b[key], rtol=1e-5, atol=1e-5)


def test_subtract_multiplier_zero_zeroes_the_weights_as_comfyui_does(executor: Executor) -> None:
    """add_patches(m2, -0, 0) scales model1 by 0 too: every weight of the result is zero, not model1's."""
    graph = {**loaders(), "3": {"class_type": "ModelMergeSubtract",
                                "inputs": {"model1": ["1", 0], "model2": ["2", 0], "multiplier": 0.0}}}
    merged = unet_weights(executor.models, node_values(executor, graph)["3"][0])
    assert all(not v.any() for v in merged.values())


def test_graphs_run_end_to_end_and_never_reload_a_checkpoint(executor: Executor) -> None:
    manager = executor.models
    # (a + b) - b, with the CLIP likewise, samples model a's image
    graph = sampled({**loaders(),
                     "3": {"class_type": "ModelMergeAdd", "inputs": {"model1": ["1", 0], "model2": ["2", 0]}},
                     "4": {"class_type": "ModelMergeSubtract", "inputs": {"model1": ["3", 0], "model2": ["2", 0],
                                                                          "multiplier": 1.0}},
                     "5": {"class_type": "CLIPMergeAdd", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1]}},
                     "6": {"class_type": "CLIPMergeSubtract", "inputs": {"clip1": ["5", 0], "clip2": ["2", 1],
                                                                         "multiplier": 1.0}}},
                    ["4", 0], ["6", 0], "roundtrip")
    plain = sampled(loaders(), ["1", 0], ["1", 1], "plain")
    first = render(executor, graph)
    base = render(executor, plain)
    assert first.shape == (64, 64, 3)
    assert np.abs(first - base).max() <= 2  # equal up to float rounding of (a + b) - b
    misses = manager.stats.misses
    graph["4"]["inputs"]["multiplier"] = 0.5
    second = render(executor, graph)
    again = render(executor, {**graph, "4": {**graph["4"], "inputs": {**graph["4"]["inputs"], "multiplier": 1.0}}})
    assert manager.stats.misses == misses
    assert np.abs(second - first).mean() > 1.0
    assert np.array_equal(again, first)


def block_ratio(key: str, ratios: dict[str, float]) -> float:
    """The ratio ModelMergeBlocks gives a diffusers SD1.5 key, written out by hand from the LDM layout."""
    if key.startswith(("conv_in.", "down_blocks.", "time_embedding.")):  # input_blocks.*, and time_embed.
        return ratios["input"]  # (matched by no input, so the first one)
    if key.startswith("mid_block."):
        return ratios["middle"]
    assert key.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")), key  # output_blocks.*, out.*
    return ratios["out"]


def test_model_merge_blocks_weighs_input_middle_and_output_blocks(executor: Executor) -> None:
    manager = executor.models
    a, b = unet_weights(manager, model(manager, A)), unet_weights(manager, model(manager, B))
    ratios = {"input": 0.2, "middle": 0.5, "out": 0.9}
    graph = {**loaders(), "3": {"class_type": "ModelMergeBlocks",
                                "inputs": {"model1": ["1", 0], "model2": ["2", 0], **ratios}}}
    merged = unet_weights(manager, node_values(executor, graph)["3"][0])
    for key in a:
        r = block_ratio(key, ratios)
        torch.testing.assert_close(merged[key], r * a[key] + (1 - r) * b[key], rtol=1e-5, atol=1e-6)


def every_ratio(node: type, **given: float) -> dict[str, float]:
    """All of a block merge's ratio inputs (an API prompt names every required input): 1.0 unless given."""
    names = [n for n in node.model_fields if n not in ("model1", "model2")]
    return {n: 1.0 for n in names} | given


def test_model_merge_sd1_weighs_each_block_by_its_own_ratio(executor: Executor) -> None:
    manager = executor.models
    a, b = unet_weights(manager, model(manager, A)), unet_weights(manager, model(manager, B))
    # input_blocks.1. is the first resnet and its attention; input_blocks.1. must not take input_blocks.10.
    ratios = {"time_embed.": 0.5, "input_blocks.1.": 0.0, "middle_block.1.": 0.3, "out.": 0.25}
    graph = {**loaders(), "3": {"class_type": "ModelMergeSD1",
                                "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                           **every_ratio(ModelMergeSD1, **ratios)}}}
    merged = unet_weights(manager, node_values(executor, graph)["3"][0])

    def expected_ratio(key: str) -> float:
        if key.startswith("time_embedding."):
            return 0.5
        if key.startswith(("down_blocks.0.resnets.0.", "down_blocks.0.attentions.0.")):
            return 0.0
        if key.startswith("mid_block.attentions.0."):
            return 0.3
        if key.startswith(("conv_norm_out.", "conv_out.")):
            return 0.25
        return 1.0

    assert sum(expected_ratio(k) == 0.0 for k in a) > 5
    for key in a:
        r = expected_ratio(key)
        torch.testing.assert_close(merged[key], r * a[key] + (1 - r) * b[key], rtol=1e-5, atol=1e-6)


def test_model_merge_sdxl_on_a_composed_merge(executor: Executor) -> None:
    """ModelMergeSDXL(a, a + a): ratio r gives r * a + (1 - r) * 2a; ComfyUI's SDXL names have no dot."""
    manager = executor.models
    a = unet_weights(manager, model(manager, "tiny-sdxl.safetensors"))
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
             "2": {"class_type": "ModelMergeAdd", "inputs": {"model1": ["1", 0], "model2": ["1", 0]}},
             "3": {"class_type": "ModelMergeSDXL", "inputs": {"model1": ["1", 0], "model2": ["2", 0], **every_ratio(
                 ModelMergeSDXL, **{"label_emb.": 0.0, "input_blocks.0": 0.5, "middle_block.2": 0.75})}}}
    merged = unet_weights(manager, node_values(executor, graph)["3"][0])

    def expected_ratio(key: str) -> float:
        if key.startswith("add_embedding."):
            return 0.0
        if key.startswith("conv_in."):
            return 0.5
        if key.startswith("mid_block.resnets.1."):
            return 0.75
        return 1.0

    assert any(k.startswith("add_embedding.") for k in a)
    for key in a:
        r = expected_ratio(key)
        torch.testing.assert_close(merged[key], r * a[key] + (1 - r) * 2 * a[key], rtol=1e-5, atol=1e-5)


def test_block_merge_at_default_ratios_samples_model_ones_pixels_exactly(executor: Executor) -> None:
    merged = render(executor, sampled({**loaders(), "3": {"class_type": "ModelMergeSD1",
                                                          "inputs": {"model1": ["1", 0], "model2": ["2", 0],
                                                                     **every_ratio(ModelMergeSD1)}}},
                                      ["3", 0], ["1", 1], "sd1-defaults"))
    assert np.array_equal(merged, render(executor, sampled(loaders(), ["1", 0], ["1", 1], "plain")))
    object_info = node_info("ModelMergeSD1", ModelMergeSD1, lambda _: [])
    assert object_info["category"] == "advanced/model_merging/model_specific"
    names = object_info["input_order"]["required"]
    assert names[:4] == ["model1", "model2", "time_embed.", "label_emb."] and names[-1] == "out."
    assert len(names) == 2 + 2 + 12 + 3 + 12 + 1
    assert object_info["input"]["required"]["input_blocks.3."][1] == {"default": 1.0, "min": 0.0, "max": 1.0,
                                                                       "step": 0.01}
    assert node_info("ModelMergeSDXL", ModelMergeSDXL, lambda _: [])["input_order"]["required"][4] == "input_blocks.0"
