"""SD2.x checkpoints: detected from keys (eps or v-prediction as ComfyUI decides), loaded offline, drawn."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.errors import NodeExecutionError, UnsupportedModel
from engine.executor import Executor
from engine.models.detect import (Arch, detect_checkpoint, detect_from_header, predicts_v, read_header_shapes,
                                  v_prediction_probe)
from engine.models.sd2 import tiny_sd2_checkpoint
from engine.models.single_file import expected_shapes, load_checkpoint_pipeline
from engine.samplers.model_sampling import ModelSampling
from tests.engine.conftest import txt2img

CPU = torch.device("cpu")
TINY_SD2 = "tiny-sd2-v.safetensors"


def sd2_header(*, real: bool = True) -> dict[str, tuple[int, ...]]:
    """An SD2 file's header as stabilityai ships it: the layout Noodle expects plus OpenCLIP's 24th block and
    projection, which no loader reads."""
    shapes = dict(expected_shapes(Arch.of("sd2", not real)))
    width = shapes["cond_stage_model.model.token_embedding.weight"][1]
    block = "cond_stage_model.model.transformer.resblocks.23."
    shapes |= {block + "attn.in_proj_weight": (3 * width, width), block + "ln_1.weight": (width,),
               "cond_stage_model.model.text_projection": (width, width), "cond_stage_model.model.logit_scale": ()}
    return shapes


def test_tiny_sd2_file_is_detected_as_sd2_v_prediction(tiny_models: Path) -> None:
    arch = detect_checkpoint(tiny_models / "checkpoints" / TINY_SD2)
    assert (arch.family, arch.name, arch.tiny, arch.prediction) == ("sd2", "tiny-sd2", True, "v_prediction")
    assert arch.sampling == ModelSampling("v_prediction")
    shapes = read_header_shapes(tiny_models / "checkpoints" / TINY_SD2)
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in shapes  # the whole OpenCLIP


def test_sd2_512_eps_header_is_detected_as_real_sd2_eps() -> None:
    shapes = sd2_header()
    # the SD2 facts the configs carry: a 1024-wide context, linear proj_in, 64-channel heads
    assert shapes["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    arch = detect_from_header(shapes, "v2-1_512-ema-pruned.safetensors")
    assert arch == Arch.of("sd2", tiny=False) and arch.prediction == "eps" and arch.name == "sd2"


def test_a_file_with_a_quiet_probe_bias_is_eps_and_a_loud_one_v(tmp_path: Path) -> None:
    path = tmp_path / "v2-base.safetensors"
    save_file(tiny_sd2_checkpoint(9, v_prediction=False), str(path))
    assert detect_checkpoint(path).prediction == "eps"
    shapes = read_header_shapes(path)
    assert v_prediction_probe(shapes) == "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.norm1.bias"
    assert v_prediction_probe(sd2_header()) == (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias")  # ComfyUI's key in SD2
    # SD20.model_type: std (population) above 0.09
    assert predicts_v(torch.tensor([0.1, -0.1])) and not predicts_v(torch.tensor([0.08, -0.08]))


def test_sdxl_v_pred_and_ztsnr_keys_mark_the_checkpoints_sampling() -> None:
    shapes = dict(expected_shapes(Arch.of("sdxl", tiny=False)))
    assert detect_from_header(shapes).sampling == ModelSampling("eps")
    assert detect_from_header(shapes | {"v_pred": (0,)}).sampling == ModelSampling("v_prediction")
    assert detect_from_header(shapes | {"v_pred": (0,), "ztsnr": (0,)}).sampling == ModelSampling(
        "v_prediction", zsnr=True)


def test_sd2_text_encoder_is_comfys_penultimate_layer_normed_and_padded_with_zero(executor: Executor,
                                                                                   tiny_models: Path) -> None:
    workflow = txt2img(checkpoint=TINY_SD2, prompt="a red fox")
    run = executor.begin(workflow)
    for node_id in ("4", "6"):
        run.compute(node_id)
    embeds = run.values["6"][0].items[0].embeds
    pipe = run.values["4"][0].pipe
    # ComfyUI's SD2 tokenizer: start, the words, end, then "!" (id 0) up to 77
    words = pipe.tokenizer("a red fox", add_special_tokens=False).input_ids
    ids = torch.tensor([[49406, *words, 49407] + [0] * (77 - len(words) - 2)])
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        # the 23-block model's last hidden state is OpenCLIP's 24-block penultimate one, through ln_final
        text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5.6 has no level
        expected = text_model.final_layer_norm(out.hidden_states[-1])
    assert pipe.text_encoder.config.num_hidden_layers == 23
    assert torch.allclose(embeds, expected.float(), atol=1e-5)


def test_clip_set_last_layer_minus_one_on_sd2_is_refused_by_name(executor: Executor) -> None:
    workflow = txt2img(checkpoint=TINY_SD2)
    workflow["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -1}}
    workflow["6"]["inputs"]["clip"] = ["10", 0]
    with pytest.raises(NodeExecutionError, match="CLIPSetLastLayer -1 on an SD2 checkpoint.*use -2"):
        executor.run(workflow)


def saved(executor: Executor, workflow: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    result = executor.run(workflow)
    [image] = result.outputs["9"]["images"]
    path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path)).astype(int), result.meta


def forced(workflow: dict[str, Any], sampling: str) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed["20"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["4", 0], "sampling": sampling,
                                                                         "zsnr": False}}
    changed["3"]["inputs"]["model"] = ["20", 0]
    return changed


def test_tiny_sd2_v_prediction_draws_end_to_end_as_v_prediction(executor: Executor) -> None:
    workflow = txt2img(checkpoint=TINY_SD2, seed=11)
    drawn, meta = saved(executor, workflow)
    assert meta["models"]["checkpoints"][TINY_SD2]["arch"] == "sd2"
    assert drawn.shape == (64, 64, 3) and drawn.std() > 1
    # the checkpoint's own sampling is v-prediction: forcing it changes nothing, forcing eps changes the picture
    assert np.array_equal(saved(executor, forced(workflow, "v_prediction"))[0], drawn)
    assert not np.array_equal(saved(executor, forced(workflow, "eps"))[0], drawn)


def test_tiny_sd2_loads_with_every_weight_from_the_file(tiny_models: Path) -> None:
    path = tiny_models / "checkpoints" / TINY_SD2
    pipe = load_checkpoint_pipeline(path, detect_checkpoint(path), CPU, torch.float32)
    state = tiny_sd2_checkpoint(6)
    loaded = pipe.text_encoder.state_dict()
    key = next(k for k in loaded if k.endswith("encoder.layers.22.mlp.fc1.weight"))
    assert torch.equal(loaded[key], state["cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight"])
    assert pipe.unet.config.cross_attention_dim == 32 and pipe.unet.config.use_linear_projection


def test_sd2_unclip_and_sgm_layout_are_refused_by_name() -> None:
    unclip = sd2_header() | {"model.diffusion_model.label_emb.0.0.weight": (1280, 1536)}
    with pytest.raises(UnsupportedModel, match="unCLIP"):
        detect_from_header(unclip, "sd21-unclip-h.safetensors")
    sgm = {("conditioner.embedders.0.model." + k.removeprefix("cond_stage_model.model.")
            if k.startswith("cond_stage_model.") else k): v for k, v in sd2_header().items()}
    with pytest.raises(UnsupportedModel, match="sgm layout"):
        detect_from_header(sgm, "sd2-sgm.safetensors")
