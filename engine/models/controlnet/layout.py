"""Which ControlNet a file holds, read from its keys and shapes: layout, architecture, and a diffusers config.

Users have three layouts: lllyasviel's original SD1.5 files (`control_model.*`, LDM names; some without the
prefix), diffusers' (`controlnet_cond_embedding.*`, `down_blocks.*`, `controlnet_down_blocks.*`: most SDXL
ControlNets) and the original layout for SDXL. An original file is renamed to diffusers' names with diffusers'
own `convert_controlnet_checkpoint` (plus SDXL's `label_emb`, which it leaves out); the config for diffusers'
`ControlNetModel` comes from the shapes (widths, depths, context width) and, for what shapes cannot tell (group
norm size, attention heads), from the UNet config of the matching architecture in engine/models/configs/. No
config is ever fetched. Anything else is refused with what the file seems to be.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from engine.errors import UnsupportedModel
from engine.models.detect import Arch, Family

__all__ = ["ControlNetLayout", "SUPPORTED_CONTROLNETS", "read_layout", "to_diffusers_names"]

Layout = Literal["original", "diffusers"]
V = TypeVar("V")

SUPPORTED_CONTROLNETS = ("Noodle runs SD1.x and SDXL ControlNets (lllyasviel's original control_model.* files and "
                         "diffusers' layout) from .safetensors files")
ORIGINAL_PROBES = ("control_model.zero_convs.0.0.weight", "zero_convs.0.0.weight")
DIFFUSERS_PROBE = "controlnet_cond_embedding.conv_in.weight"
# SDXL's pooled-text + size embedding: convert_controlnet_checkpoint maps only the SD1.x keys
_LABEL_EMB = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}


@dataclass(frozen=True)
class ControlNetLayout:
    """What a ControlNet file is: its key layout, the UNet architecture it fits, and the ControlNetModel config."""

    layout: Layout
    arch: Arch
    config: Mapping[str, Any]
    diff: bool = False  # a "diff" ControlNet: its weights are differences from the model's (DiffControlNetLoader)

    @property
    def family(self) -> Family:
        return self.arch.family

    def describe(self) -> str:
        size = "tiny " if self.arch.tiny else ""
        kind = "diff " if self.diff else ""
        return f"{size}{'SDXL' if self.family == 'sdxl' else 'SD1.x'} {kind}ControlNet ({self.layout} layout)"


def _refuse(name: str, problem: str) -> UnsupportedModel:
    return UnsupportedModel(f"ControlNet {name!r} {problem}; {SUPPORTED_CONTROLNETS}")


def _what_else(keys: Sequence[str]) -> str:
    """A guess at what a file without a known ControlNet layout is."""
    if "lora_controlnet" in keys:
        return "is a Control-LoRA, which Noodle does not run"
    if any(k.startswith("control_add_embedding.") for k in keys) or "task_embedding" in keys:
        return "is a ControlNet Union (ProMax) model, which Noodle does not run"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "looks like a whole checkpoint, not a ControlNet (put it in checkpoints/)"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k for k in keys):
        return "looks like a LoRA, not a ControlNet (put it in loras/)"
    if any(k.startswith("controlnet_blocks.") for k in keys) or any("double_blocks." in k for k in keys):
        return "looks like an SD3 or Flux ControlNet, which Noodle does not run"
    if any(k.startswith(("adapter.", "body.")) for k in keys):
        return "looks like a T2I-Adapter, which Noodle does not run"
    return "has neither the original (control_model.zero_convs.*) nor the diffusers (controlnet_cond_embedding.*) keys"


def _rename_original(state: Mapping[str, V], name: str) -> dict[str, V]:
    """Original-layout keys (with or without `control_model.`) renamed to diffusers' ControlNetModel names.

    Works on tensors and on header shapes alike: the conversion only moves values between keys.
    """
    prefix = "control_model." if ORIGINAL_PROBES[0] in state else ""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != "difference"}
    # layers per block: input_blocks.0 is conv_in, then that many resnets before the first downsampler
    downsamplers = sorted(int(m[1]) for k in inner if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    blocks = {int(m[1]) for k in inner if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if not blocks or "time_embed.0.weight" not in inner:
        raise _refuse(name, "has original-layout zero_convs but no input_blocks or time_embed")
    layers = downsamplers[0] - 1 if downsamplers else max(blocks)
    # convert_controlnet_checkpoint reads unprefixed files only when it sees time_embed at the top
    converted = convert_controlnet_checkpoint(dict(inner), {"layers_per_block": layers})
    out = {key: value for key, value in converted.items() if value is not None}
    for key, value in inner.items():
        for old, new in _LABEL_EMB.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def to_diffusers_names(state: Mapping[str, V], name: str = "<state>") -> tuple[dict[str, V], Layout]:
    """A ControlNet's keys in diffusers' names, and which layout the file had."""
    if any(probe in state for probe in ORIGINAL_PROBES):
        return _rename_original(state, name), "original"
    if DIFFUSERS_PROBE in state:
        return dict(state), "diffusers"
    raise _refuse(name, _what_else(list(state)))


def _count(keys: Sequence[str], pattern: str) -> int:
    """How many distinct indices the (\\d+) of `pattern` takes among `keys`."""
    compiled = re.compile(pattern)
    return len({m[1] for k in keys if (m := compiled.match(k))})


def _unet_config(arch: Arch) -> dict[str, Any]:
    return json.loads((arch.config_dir / "unet" / "config.json").read_text())


def read_layout(shapes: Mapping[str, Sequence[int]], name: str) -> ControlNetLayout:
    """The layout, architecture and ControlNetModel config of a ControlNet file, from its keys and shapes."""
    keys = list(shapes)
    if "lora_controlnet" in keys or "task_embedding" in keys or any(
            k.startswith("control_add_embedding.") for k in keys):
        raise _refuse(name, _what_else(keys))
    renamed, layout = to_diffusers_names(shapes, name)
    sd = list(renamed)
    try:
        levels = _count(sd, r"down_blocks\.(\d+)\.")
        widths = [int(renamed[f"down_blocks.{level}.resnets.0.conv1.weight"][0]) for level in range(levels)]
        layers = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
        attention = [any(k.startswith(f"down_blocks.{level}.attentions.") for k in sd) for level in range(levels)]
        depths = [_count(sd, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
                  for level in range(levels)]
        to_k = next(k for k in sd if k.endswith("attn2.to_k.weight"))
        context = int(renamed[to_k][1])
        proj_in = next(k for k in sd if k.endswith("proj_in.weight"))
        hint = renamed[DIFFUSERS_PROBE]
        hint_blocks = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
        embedding = [int(hint[0])] + [int(renamed[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"][0])
                                      for i in range(hint_blocks // 2)]
    except (KeyError, StopIteration, IndexError) as err:
        raise _refuse(name, f"has ControlNet keys but not a UNet encoder Noodle can read (no {err})") from err
    sdxl = "add_embedding.linear_1.weight" in renamed
    family: Family = "sdxl" if sdxl else "sd15"
    arch = next((Arch.of(family, tiny) for tiny in (False, True)
                 if (cfg := _unet_config(Arch.of(family, tiny)))["block_out_channels"] == widths
                 and cfg["cross_attention_dim"] == context), None)
    if arch is None:
        if context == 1024:
            raise _refuse(name, "looks like an SD2.x ControlNet (context width 1024), which Noodle does not run")
        raise _refuse(name, f"has block widths {widths} and context width {context}, which match no SD1.x or "
                            "SDXL UNet (nor Noodle's tiny test models)")
    base = _unet_config(arch)
    mid_depth = _count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    if mid_depth and mid_depth != depths[-1]:
        raise _refuse(name, f"has {mid_depth} transformer layers in its middle block and {depths[-1]} in its last "
                            "down block; diffusers' ControlNetModel needs them equal")
    config: dict[str, Any] = {
        "in_channels": int(renamed["conv_in.weight"][1]),
        "conditioning_channels": int(hint[1]),
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "transformer_layers_per_block": depths,
        "cross_attention_dim": context,
        "use_linear_projection": len(renamed[proj_in]) == 2,
        "attention_head_dim": base["attention_head_dim"],
        "norm_num_groups": base["norm_num_groups"],
        "norm_eps": base.get("norm_eps", 1e-5),
        "flip_sin_to_cos": base.get("flip_sin_to_cos", True),
        "freq_shift": base.get("freq_shift", 0),
        "act_fn": base.get("act_fn", "silu"),
        "upcast_attention": base.get("upcast_attention", False),
    }
    if sdxl:
        config |= {"addition_embed_type": "text_time", "addition_time_embed_dim": base["addition_time_embed_dim"],
                   "projection_class_embeddings_input_dim": int(renamed["add_embedding.linear_1.weight"][1])}
    return ControlNetLayout(layout, arch, config, diff="difference" in shapes)
