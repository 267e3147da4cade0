"""SD2.x in the original single-file layout: its OpenCLIP ViT-H text encoder's keys, and Noodle's tiny SD2 file.

SD2 checkpoints keep the text encoder as OpenCLIP does, under `cond_stage_model.model.*` (token_embedding,
positional_embedding, transformer.resblocks.N with one in_proj for q, k and v, ln_final, text_projection).
diffusers' single-file loader converts them (single_file_utils.convert_open_clip_checkpoint) into a 23-layer
CLIPTextModel: it leaves out the 24th block and the projection, since SD2 reads the penultimate layer's output
through the final layer norm. That is what ComfyUI's SD2ClipModel computes ("penultimate", layer_norm_hidden_state),
so the 23-layer model's last hidden state, normed, is ComfyUI's default SD2 conditioning.

The UNet and VAE use the SD1.x layout (`to_original`); the UNet has linear proj_in/proj_out and a 1024-wide
context. `expected_shapes` (single_file.py) takes the text encoder's layout from here.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from engine.models.detect import Arch, v_prediction_probe
from engine.models.to_original import OPEN_CLIP_H_PREFIX, open_clip_h_to_original, unet_to_original, vae_to_original

__all__ = ["OPEN_CLIP_H_PREFIX", "tiny_sd2_checkpoint"]

# ComfyUI's SD20.model_type: a 4-channel SD2 UNet whose probe bias has a standard deviation above 0.09 is
# v-prediction; the tiny v-prediction file gets a bias well above it, the tiny eps one none
_V_PRED_BIAS_STD = 0.5


def tiny_sd2_checkpoint(seed: int, *, v_prediction: bool = True) -> dict[str, Tensor]:
    """A tiny SD2 single file as SD2.x ships: UNet, VAE and the whole 24-block OpenCLIP text encoder (the 24th
    block and the projection are in the file, as in stabilityai's, and no loader uses them). Random from `seed`;
    the v-prediction probe bias (`v_prediction_probe`) is loud for a 768-v style file, zero for a 512-base one.
    """
    config_dir = Arch.of("sd2", True).config_dir
    te_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder")
    te_config.num_hidden_layers += 1  # the file's 24th block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")).eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")).eval()
        te = CLIPTextModel(te_config).eval()
        projection = torch.randn(te_config.hidden_size, te_config.hidden_size) * te_config.hidden_size**-0.5
    state = {**unet_to_original(unet), **vae_to_original(vae),
             **open_clip_h_to_original(te, with_projection=projection)}
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)  # ln(100), as OpenCLIP's
    probe = v_prediction_probe({key: tuple(tensor.shape) for key, tensor in state.items()})
    if probe is None:
        raise ValueError("the tiny SD2 UNet has no output block with a transformer: nothing to mark v-prediction")
    generator = torch.Generator().manual_seed(seed + 1)
    width = state[probe].shape[0]
    state[probe] = (torch.randn(width, generator=generator) * _V_PRED_BIAS_STD if v_prediction
                    else torch.zeros(width))
    return {key: tensor.detach().contiguous() for key, tensor in state.items()}
