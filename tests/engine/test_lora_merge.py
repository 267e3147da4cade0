"""LoRAs (one, two stacked, strength 0, no reload) and merging (ModelMergeSimple, CLIPMergeSimple, CheckpointSave)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.executor import Executor
from engine.models.lora import folded_state_dict
from engine.models.manager import ModelManager
from engine.models.single_file import load_checkpoint_pipeline
from engine.models.detect import detect_checkpoint
from engine.values import ClipRef, LoraPatch, ModelRef
from tests.engine.conftest import txt2img
from tests.engine.test_runs import fresh_run, image_paths, pixels


def unet_weights(manager: ModelManager, model: ModelRef) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in folded_state_dict(manager.use_unet(model)).items()}


def base_model(manager: ModelManager, name: str = "tiny-sd15.safetensors") -> ModelRef:
    loaded = manager.checkpoint(name)
    return ModelRef(loaded, loaded.pipe, label=name)


def render(executor: Executor, workflow: dict, node: str = "9") -> np.ndarray:
    return pixels(image_paths(executor, fresh_run(executor, workflow)["outputs"], node)[0])


def test_one_lora_changes_the_image_and_strength_zero_is_the_base_exactly(executor: Executor) -> None:
    base = render(executor, txt2img(seed=4))
    with_lora = render(executor, txt2img(seed=4, loras=[("tiny-lora-a.safetensors", 1.0, 1.0)]))
    zero = render(executor, txt2img(seed=4, loras=[("tiny-lora-a.safetensors", 0.0, 0.0)]))
    assert np.abs(with_lora - base).mean() > 1.0
    assert np.array_equal(zero, base)
    # and back to no LoRA: the adapters are switched off, the base weights untouched
    again = render(executor, txt2img(seed=4))
    assert np.array_equal(again, base)


def test_two_stacked_loras_add_up_on_the_weights(executor: Executor) -> None:
    manager = executor.models
    model = base_model(manager)
    base = unet_weights(manager, model)
    one_a = unet_weights(manager, model.with_lora(LoraPatch("tiny-lora-a.safetensors", 1.0)))
    one_b = unet_weights(manager, model.with_lora(LoraPatch("tiny-lora-b.safetensors", 1.0)))
    s1, s2 = 0.7, -0.4
    both = unet_weights(manager, model.with_lora(LoraPatch("tiny-lora-a.safetensors", s1))
                        .with_lora(LoraPatch("tiny-lora-b.safetensors", s2)))
    changed = [k for k in base if not torch.equal(one_a[k], base[k])]
    assert len(changed) > 10
    for key in base:
        expected = base[key] + s1 * (one_a[key] - base[key]) + s2 * (one_b[key] - base[key])
        torch.testing.assert_close(both[key], expected, rtol=1e-5, atol=1e-6)


def test_changing_loras_never_reloads_the_checkpoint(executor: Executor) -> None:
    manager = executor.models
    fresh_run(executor, txt2img(seed=1))
    misses = manager.stats.misses
    for strengths in ((1.0, 1.0), (0.5, 0.2), (-1.0, 0.0)):
        fresh_run(executor, txt2img(seed=1, loras=[("tiny-lora-a.safetensors", *strengths),
                                                   ("tiny-lora-b.safetensors", 0.3, 0.3)]))
    assert manager.stats.misses == misses


def merge_graph(ratio: float, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15-b.safetensors"}},
        "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": ratio}},
        "4": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["1", 1], "clip2": ["2", 1], "ratio": ratio}},
        "5": {"class_type": "CheckpointSave", "inputs": {"model": ["3", 0], "clip": ["4", 0], "vae": ["1", 2],
                                                        "filename_prefix": f"checkpoints/{prefix}"}},
    }


def sampled_merge_graph(ratio: float, prefix: str) -> dict:
    """merge_graph with a sampler on the merged model (node 3) and its image saved by node 10."""
    graph = merge_graph(ratio, prefix)
    graph["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}}
    graph["7"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    graph["8"] = {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 1, "steps": 3, "cfg": 5.0,
                                                      "sampler_name": "euler", "scheduler": "normal",
                                                      "positive": ["6", 0], "negative": ["6", 0],
                                                      "latent_image": ["7", 0], "denoise": 1.0}}
    graph["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}}
    graph["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"{prefix}-image"}}
    return graph


def test_model_merge_is_a_weighted_sum_and_checkpoint_save_loads_back(executor: Executor) -> None:
    manager = executor.models
    a = unet_weights(manager, base_model(manager, "tiny-sd15.safetensors"))
    b = unet_weights(manager, base_model(manager, "tiny-sd15-b.safetensors"))
    ratio = 0.3
    result = executor.run(merge_graph(ratio, "merged"))
    [saved] = result.outputs["5"]["checkpoints"]
    path = executor.settings.output_dir / saved["subfolder"] / saved["filename"]
    assert path.name == "merged_00001_.safetensors"
    arch = detect_checkpoint(path)
    assert arch.family == "sd15"
    pipe = load_checkpoint_pipeline(path, arch, "cpu", torch.float32)
    loaded = pipe.unet.state_dict()
    for key in a:
        torch.testing.assert_close(loaded[key], ratio * a[key] + (1 - ratio) * b[key], rtol=1e-5, atol=1e-6)
    te_a, te_b = (folded_state_dict(manager.use_text_encoders(ClipRef(m.checkpoint, m.pipe))[0])
                  for m in (base_model(manager, "tiny-sd15.safetensors"), base_model(manager, "tiny-sd15-b.safetensors")))
    te = pipe.text_encoder.state_dict()
    key = "encoder.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(te[key], ratio * te_a[key] + (1 - ratio) * te_b[key], rtol=1e-5, atol=1e-6)


def test_merge_ratio_one_is_model_one(executor: Executor) -> None:
    graph = sampled_merge_graph(1.0, "ratio-one")
    merged = render(executor, graph, "10")
    graph["8"]["inputs"]["model"] = ["1", 0]
    assert np.array_equal(merged, render(executor, graph, "10"))


def test_a_merge_keeps_model_ones_model_sampling(executor: Executor) -> None:
    """ComfyUI's ModelMergeSimple clones model1, ModelSamplingDiscrete override and all."""
    graph = sampled_merge_graph(1.0, "sampling-kept")
    graph["11"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction",
                                                                    "zsnr": False}}
    graph["3"]["inputs"]["model1"] = ["11", 0]
    merged = render(executor, graph, "10")
    graph["8"]["inputs"]["model"] = ["11", 0]  # the v-prediction model itself, unmerged
    assert np.array_equal(merged, render(executor, graph, "10"))
    graph["8"]["inputs"]["model"] = ["1", 0]  # and eps differs, so the override is what made them equal
    assert not np.array_equal(merged, render(executor, graph, "10"))


def test_an_inpainting_model_merges_with_a_plain_one_as_comfyui_does() -> None:
    # ComfyUI's model_merging_inpaint example: inpainting + (other - base). Its 9-channel first convolution is scaled
    # by model1's factor and the 4-channel one is left out ("WEIGHT NOT MERGED"); every other weight merges
    from engine.nodes.merging import combine

    inpaint = {"conv_in.weight": torch.ones(8, 9, 3, 3), "mid.weight": torch.full((8, 8), 2.0)}
    plain = {"conv_in.weight": torch.full((8, 4, 3, 3), 5.0), "mid.weight": torch.full((8, 8), 3.0)}
    merged = combine(inpaint, plain, lambda key: (0.5, 0.25), "model")
    assert torch.equal(merged["conv_in.weight"], torch.full((8, 9, 3, 3), 0.5))
    assert torch.equal(merged["mid.weight"], torch.full((8, 8), 2.0 * 0.5 + 3.0 * 0.25))
    wider = {**plain, "mid.weight": torch.zeros(8, 16)}  # another architecture, not just another conv_in
    with pytest.raises(ValueError, match="different architectures"):
        combine(inpaint, wider, lambda key: (0.5, 0.5), "model")


def test_the_inpaint_merge_workflow_runs_on_the_tiny_models(executor: Executor) -> None:
    graph = merge_graph(0.5, "inpaint-merge")
    graph["1"]["inputs"]["ckpt_name"] = "tiny-sd15-inpainting.safetensors"
    result = executor.run(graph)
    [saved] = result.outputs["5"]["checkpoints"]
    arch = detect_checkpoint(executor.settings.output_dir / saved["subfolder"] / saved["filename"])
    assert arch.family == "sd15" and arch.in_channels == 9  # model1's channels, as ComfyUI keeps them
