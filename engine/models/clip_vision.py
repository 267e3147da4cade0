"""CLIP vision files (the `clip_vision` models folder) as transformers' CLIPVisionModelWithProjection, and
ComfyUI 0.3.64's image encode (comfy/clip_vision.py): the preprocessing, then image_embeds, last_hidden_state and
penultimate_hidden_states.

A file is one .safetensors in either layout ComfyUI reads: transformers' own keys (`vision_model.*`,
`visual_projection.weight`: clip_vision_g, clip_vision_h, ViT-L), or open_clip's `visual.*` (as an unCLIP
checkpoint embeds it), which `to_transformers_keys` renames. Shapes give the architecture; what they cannot give
(heads, activation) is ComfyUI's: its CLIP vision configs all have 16 heads, and only its ViT-L ones (24 layers)
use quick_gelu. SigLIP and DINOv2 encoders (other families' image encoders) are refused with that reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.errors import UnsupportedModel
from engine.models.detect import read_safetensors
from engine.values import ClipVisionOutput, ClipVisionRef

if TYPE_CHECKING:
    from transformers import CLIPVisionConfig

__all__ = ["clip_preprocess", "encode_image", "read_clip_vision", "to_transformers_keys", "vision_config"]

HEADS = 16  # every CLIP vision config ComfyUI ships (clip_vision_config_g/_h/_vitl*.json)
VIT_L_LAYERS = 24  # its ViT-L configs, the only ones with quick_gelu
_OPEN_CLIP_NAMES = {"class_embedding": "vision_model.embeddings.class_embedding",
                    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
                    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
                    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
                    "ln_post.weight": "vision_model.post_layernorm.weight",
                    "ln_post.bias": "vision_model.post_layernorm.bias"}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}


def to_transformers_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under `prefix` with transformers' CLIP vision names, as comfy/clip_vision.py convert_to_transformers:
    open_clip's resblocks (fused in_proj split into q/k/v, `proj` transposed into visual_projection) or, for a file
    already in transformers' layout, the prefix dropped."""
    own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if "transformer.resblocks.0.attn.in_proj_weight" not in own:
        return own
    out: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if key in _OPEN_CLIP_NAMES:
            out[_OPEN_CLIP_NAMES[key]] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.transpose(0, 1).contiguous()
        elif key.startswith("transformer.resblocks."):
            block, rest = key[len("transformer.resblocks."):].split(".", 1)
            target = f"vision_model.encoder.layers.{block}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{target}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                module, kind = rest.rsplit(".", 1)
                if module in _OPEN_CLIP_BLOCK:
                    out[f"{target}{_OPEN_CLIP_BLOCK[module]}.{kind}"] = value
    return out


def vision_config(state: dict[str, torch.Tensor], name: str) -> CLIPVisionConfig:
    """The CLIPVisionConfig a transformers-layout state dict was saved from, read off its shapes."""
    from transformers import CLIPVisionConfig  # noqa: F811  (imported here: transformers loads slowly)

    if "vision_model.embeddings.class_embedding" not in state or "vision_model.pre_layrnorm.weight" not in state:
        family = "SigLIP" if "vision_model.embeddings.position_embedding.weight" in state else "not a CLIP one"
        raise UnsupportedModel(f"clip_vision file {name!r} is not a CLIP vision encoder ({family}); Noodle loads "
                               "CLIP ViT image encoders (clip_vision_g, clip_vision_h, ViT-L) in ComfyUI's layout")
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0] - 1  # the class token's
    side = math.isqrt(positions)
    layers = 1 + max(int(key.split(".")[3]) for key in state if key.startswith("vision_model.encoder.layers."))
    hidden = patch.shape[0]
    projection = state.get("visual_projection.weight")
    if projection is None:
        raise UnsupportedModel(f"clip_vision file {name!r} has no visual_projection: its image_embeds, which "
                               "unCLIPConditioning reads, cannot be made")
    if side * side != positions or hidden % HEADS:
        raise UnsupportedModel(f"clip_vision file {name!r} has {positions + 1} position embeddings of width "
                               f"{hidden}: not a CLIP ViT layout (a square of patches plus a class token, a width "
                               f"divisible by {HEADS} heads)")
    return CLIPVisionConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
        intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        patch_size=patch.shape[-1], image_size=side * patch.shape[-1], num_channels=patch.shape[1],
        projection_dim=projection.shape[0], hidden_act="quick_gelu" if layers == VIT_L_LAYERS else "gelu",
        layer_norm_eps=1e-5)


def read_clip_vision(path: Path, name: str, device: torch.device, dtype: torch.dtype,
                     prefix: str | None = None) -> ClipVisionRef:
    """Load a CLIP vision .safetensors (or the part under `prefix` of a bigger file) onto `device` in `dtype`.

    Keys the model has no place for (position_ids, a LLaVA projector) are left out, as ComfyUI's strict=False load
    does; a missing weight is refused rather than left random."""
    from transformers import CLIPVisionModelWithProjection

    state = read_safetensors(path, f"clip_vision file {name!r}")
    if prefix is None:
        prefix = "visual." if "visual.transformer.resblocks.0.attn.in_proj_weight" in state else ""
    state = to_transformers_keys(state, prefix)
    config = vision_config(state, name)
    with torch.device("meta"):
        module = CLIPVisionModelWithProjection(config)
    expected = module.state_dict().keys()
    missing = sorted(set(expected) - state.keys())
    if missing:
        raise UnsupportedModel(f"clip_vision file {name!r} lacks {len(missing)} weight(s) of its architecture, "
                               f"first {missing[0]!r}: it is damaged or not a CLIP vision encoder")
    module.load_state_dict({key: state[key] for key in expected}, assign=True)
    # the one buffer no file holds (built on the meta device, so a ViT-G is not first filled with random weights)
    embeddings = module.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipVisionRef(module, name, image_size=config.image_size)


def clip_preprocess(pixels: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    crop: bool = True) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 -> CLIP's input [B, 3, size, size], as comfy/clip_vision.py clip_preprocess.

    `crop`: the short side scaled to `size` and the middle cut out ("center"); else squeezed to size x size
    ("none"). Bicubic with antialias, then rounded to 8-bit levels, then normalised with CLIP's mean and std."""
    image = pixels[..., :3].movedim(-1, 1)
    if image.shape[2] != size or image.shape[3] != size:
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scaled = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scaled = (size, size)
        image = F.interpolate(image, size=scaled, mode="bicubic", antialias=True)
        top, left = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, top:top + size, left:left + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean_t) / std_t


def encode_image(clip_vision: ClipVisionRef, pixels: torch.Tensor, crop: bool = True) -> ClipVisionOutput:
    """CLIPVisionEncode's output: the projected pooled embedding, the last hidden state and the penultimate one
    (the second-to-last layer's output, ComfyUI's intermediate_output=-2), float32 on the CPU."""
    module = clip_vision.module
    param = next(module.parameters())
    # preprocessing in float32 on the device, as ComfyUI's (.float() after clip_preprocess), then the model's dtype
    values = clip_preprocess(pixels.to(param.device, torch.float32), clip_vision.image_size, clip_vision.image_mean,
                             clip_vision.image_std, crop)
    with torch.inference_mode():
        out = module(pixel_values=values.to(param.dtype), output_hidden_states=True)
    return ClipVisionOutput(image_embeds=out.image_embeds.float().cpu(),
                            last_hidden_state=out.last_hidden_state.float().cpu(),
                            penultimate_hidden_states=out.hidden_states[-2].float().cpu())
