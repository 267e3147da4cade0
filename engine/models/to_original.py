"""Diffusers components -> the original ("LDM") single-file key layout of SD1.x and SDXL.

A1111, ComfyUI and most model sites share one layout: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE), `cond_stage_model.transformer.text_model.*` (SD1 CLIP-L) or
`conditioner.embedders.{0,1}.*` (SDXL CLIP-L and OpenCLIP bigG). Noodle loads such files through
diffusers' `from_single_file`; this module is the inverse, used to write the tiny test models and by
the CheckpointSave node. It mirrors the facts in diffusers' `loaders/single_file_utils.py`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`).

Every converter maps every key of its component or raises: a weight silently left out would make a
file that loads with random parts elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, Protocol

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn

__all__ = [
    "OPEN_CLIP_H_PREFIX",
    "PipelineLike",
    "open_clip_h_to_original",
    "pipeline_to_original",
    "text_encoders_to_original",
    "unet_original_namer",
    "unet_to_original",
    "vae_file_dict",
    "vae_to_original",
]

Family = Literal["sd15", "sd2", "sdxl"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = {
    "sd15": "cond_stage_model.transformer.text_model.",
    "sdxl": "conditioner.embedders.0.transformer.text_model.",
}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_H_PREFIX = "cond_stage_model.model."  # SD2.x's one text encoder

# Whole-key renames at the top of the UNet (diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"]).
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# Inside a UNet resnet: LDM's ResBlock keeps its layers in Sequentials (in_layers = norm, act, conv).
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
# Inside a VAE mid attention: LDM's AttnBlock uses 1x1 convolutions where diffusers uses Linear.
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


_ADAPTER_MARKERS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_magnitude_vector.")


def _state(module: nn.Module, what: str) -> dict[str, Tensor]:
    """A module's state dict, refusing one with live peft adapters.

    peft wraps a layer as `to_q.base_layer` + `to_q.lora_A.<name>`: converted as is, those keys
    would land in the file under names no loader knows. Fold the LoRA into the weights first.
    """
    state = module.state_dict()
    wrapped = next((key for key in state if any(marker in key for marker in _ADAPTER_MARKERS)), None)
    if wrapped is not None:
        raise ValueError(f"{what} has LoRA adapters attached ({wrapped}); fold them into the weights before saving")
    return state


def _per_level(value: int | Iterable[int], levels: int) -> list[int]:
    """A diffusers per-level option (an int or one value per level) as a list."""
    return [value] * levels if isinstance(value, int) else list(value)


def _rename(state: dict[str, Tensor], prefixes: list[tuple[str, str, dict[str, str]]], what: str) -> dict[str, Tensor]:
    """Rename each key by its longest matching (diffusers prefix -> LDM prefix, inner renames) rule.

    Raises ValueError naming the first key no rule covers, so a converter can never drop a weight.
    """
    rules = sorted(prefixes, key=lambda rule: len(rule[0]), reverse=True)
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        for old, new, inner in rules:
            if key.startswith(old):
                rest = key[len(old):]
                for inner_old, inner_new in inner.items():
                    if rest.startswith(inner_old):
                        rest = inner_new + rest[len(inner_old):]
                        break
                out[new + rest] = tensor
                break
        else:
            raise ValueError(f"{what}: no original-layout name for diffusers key {key!r}")
    return out


def _unet_rules(unet: UNet2DConditionModel) -> list[tuple[str, str, dict[str, str]]]:
    """Prefix rules for one UNet, derived from its config and which blocks have attention/samplers."""
    levels = len(unet.config.block_out_channels)
    down_layers = _per_level(unet.config.layers_per_block, levels)
    up_layers = list(reversed(down_layers))
    rules: list[tuple[str, str, dict[str, str]]] = [(old, new, {}) for old, new in _UNET_TOP.items()]

    # input_blocks.0 is conv_in; then per level one block per resnet (+ its attention at .1),
    # and one more block for the downsampler, whose conv LDM calls `op`.
    index = 1
    for level, block in enumerate(unet.down_blocks):
        for layer in range(down_layers[level]):
            rules.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", _UNET_RESNET))
            if getattr(block, "attentions", None) is not None:
                rules.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", {}))
            index += 1
        if block.downsamplers is not None:
            rules.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}))
            index += 1

    # middle_block is resnet, attention, resnet.
    rules += [
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]

    # Up levels have one resnet more than down levels; the upsampler sits in the level's last
    # output block, after the attention when there is one (.2.conv), else after the resnet (.1.conv).
    index = 0
    for level, block in enumerate(unet.up_blocks):
        has_attention = getattr(block, "attentions", None) is not None
        count = up_layers[level] + 1
        for layer in range(count):
            rules.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            if has_attention:
                rules.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", {}))
            if layer == count - 1 and block.upsamplers is not None:
                slot = 2 if has_attention else 1
                rules.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", {}))
            index += 1
    return rules


def unet_original_namer(unet: UNet2DConditionModel) -> Callable[[str], str]:
    """A function from one of `unet`'s diffusers weight names to its original-layout name (without the
    `model.diffusion_model.` prefix), for code that weighs a weight by its block (the block merges)."""
    rules = _unet_rules(unet)

    def original(key: str) -> str:
        [renamed] = _rename({key: key}, rules, "UNet")  # type: ignore[dict-item]
        return renamed

    return original


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, Tensor]:
    """The UNet's weights under `model.diffusion_model.*` names (SD1.x and SDXL layouts)."""
    if unet.config.class_embed_type is not None:
        raise ValueError(f"UNet class_embed_type {unet.config.class_embed_type!r} has no SD1.x/SDXL layout")
    renamed = _rename(_state(unet, "UNet"), _unet_rules(unet), "UNet")
    return {UNET_PREFIX + key: tensor for key, tensor in renamed.items()}


def _vae_rules(vae: AutoencoderKL) -> list[tuple[str, str, dict[str, str]]]:
    """Prefix rules for an AutoencoderKL; the decoder's `up` levels count from the lowest resolution."""
    rules: list[tuple[str, str, dict[str, str]]] = []
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", {}),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", {}),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for level, _ in enumerate(vae.encoder.down_blocks):
        rules += [
            (f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", {}),
            (f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"encoder.down.{level}.downsample.conv.", {}),
        ]
    levels = len(vae.decoder.up_blocks)
    for level in range(levels):
        # diffusers' up_blocks[0] is LDM's up[levels - 1]: LDM indexes by resolution, not by order.
        rules += [
            (f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{levels - 1 - level}.block.", {}),
            (f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{levels - 1 - level}.upsample.conv.", {}),
        ]
    rules += [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    return rules


def vae_file_dict(vae: AutoencoderKL) -> dict[str, Tensor]:
    """The VAE's weights as a standalone SD VAE file has them (`encoder.*`, `decoder.*`, no prefix)."""
    renamed = _rename(_state(vae, "VAE"), _vae_rules(vae), "VAE")
    out: dict[str, Tensor] = {}
    for key, tensor in renamed.items():
        # Resnet shortcuts are `nin_shortcut` in LDM, at any depth: one replace covers them all.
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[key] = tensor
    return out


def vae_to_original(vae: AutoencoderKL) -> dict[str, Tensor]:
    """The VAE's weights under `first_stage_model.*` names, as inside a checkpoint."""
    return {VAE_PREFIX + key: tensor for key, tensor in vae_file_dict(vae).items()}


def _clip_l_to_original(te: nn.Module, prefix: str) -> dict[str, Tensor]:
    """CLIP-L keeps the transformers names; only the prefix changes.

    transformers >= 5.6 `CLIPTextModel.state_dict()` has no `text_model.` level while
    `CLIPTextModelWithProjection` still has it: strip it when present so both give one layout.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in _state(te, "CLIP-L text encoder").items():
        key = key.removeprefix("text_model.")
        if key.startswith("text_projection"):
            raise ValueError("CLIP-L text encoder has a text_projection; SD1.x/SDXL CLIP-L has none")
        out[prefix + key] = tensor
    return out


def _open_clip_blocks(state: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """Pop an OpenCLIP text tower's blocks, embeddings and final norm from `state` (transformers' names, no
    `text_model.` prefix) under OpenCLIP's names: q, k and v in one `in_proj_weight` (nn.MultiheadAttention)."""
    out: dict[str, Tensor] = {}
    for layer in range(layers):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{src}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            out[f"{dst}attn.out_proj.{kind}"] = state.pop(f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = state.pop(f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = state.pop(f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.c_fc.{kind}"] = state.pop(f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.c_proj.{kind}"] = state.pop(f"{src}mlp.fc2.{kind}")
    out["token_embedding.weight"] = state.pop("embeddings.token_embedding.weight")
    out["positional_embedding"] = state.pop("embeddings.position_embedding.weight")
    out["ln_final.weight"] = state.pop("final_layer_norm.weight")
    out["ln_final.bias"] = state.pop("final_layer_norm.bias")
    state.pop("embeddings.position_ids", None)  # a buffer, not a weight, in older transformers
    return out


def _open_clip_to_original(te2: nn.Module) -> dict[str, Tensor]:
    """SDXL's second encoder (a CLIPTextModelWithProjection) in OpenCLIP's own names; the projection is applied as
    `x @ text_projection`, so it is stored transposed."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in _state(te2, "OpenCLIP text encoder").items()}
    out = _open_clip_blocks(state, te2.config.num_hidden_layers)
    out["text_projection"] = state.pop("text_projection.weight").T
    if state:
        raise ValueError(f"OpenCLIP text encoder: no original-layout name for {sorted(state)[:5]}")
    return {OPEN_CLIP_PREFIX + key: tensor for key, tensor in out.items()}


def open_clip_h_to_original(te: nn.Module, *, with_projection: Tensor | None = None) -> dict[str, Tensor]:
    """An SD2 text encoder (transformers CLIPTextModel) under OpenCLIP's names, `cond_stage_model.model.*`; a
    projection, if given, is stored as it is (`x @ text_projection`)."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in _state(te, "SD2 text encoder").items()}
    out = _open_clip_blocks(state, te.config.num_hidden_layers)
    if state:
        raise ValueError(f"SD2 text encoder: no original-layout name for {sorted(state)[:5]}")
    if with_projection is not None:
        out["text_projection"] = with_projection
    return {OPEN_CLIP_H_PREFIX + key: tensor for key, tensor in out.items()}


def text_encoders_to_original(family: Family, te: nn.Module, te2: nn.Module | None = None) -> dict[str, Tensor]:
    """CLIP-L (SD1.x), OpenCLIP ViT-H (SD2) or both CLIP-L and OpenCLIP bigG (SDXL) under their single-file names."""
    if family == "sd2":
        if te2 is not None:
            raise ValueError("SD2.x has one text encoder; got a second one")
        return open_clip_h_to_original(te)
    if family == "sd15":
        if te2 is not None:
            raise ValueError("SD1.x has one text encoder; got a second one")
        return _clip_l_to_original(te, CLIP_L_PREFIX["sd15"])
    if te2 is None:
        raise ValueError("SDXL needs both text encoders (CLIP-L and OpenCLIP bigG)")
    return {**_clip_l_to_original(te, CLIP_L_PREFIX["sdxl"]), **_open_clip_to_original(te2)}


class PipelineLike(Protocol):
    """What `pipeline_to_original` needs: a diffusers SD/SDXL pipeline, or `engine.tiny.TinyComponents`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module


def pipeline_to_original(pipe: PipelineLike, family: Family) -> dict[str, Tensor]:
    """A whole SD1.x / SDXL pipeline as one single-file state dict of contiguous CPU tensors.

    The result can go straight to `safetensors.torch.save_file`, which refuses non-contiguous
    tensors (the transposed OpenCLIP projection is one); contiguous CPU tensors are not copied, so
    saving a loaded full-size model does not double its memory.
    """
    te2 = getattr(pipe, "text_encoder_2", None) if family == "sdxl" else None
    state = {
        **unet_to_original(pipe.unet),
        **vae_to_original(pipe.vae),
        **text_encoders_to_original(family, pipe.text_encoder, te2),
    }
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}
