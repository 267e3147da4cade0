"""Load a single-file ControlNet into diffusers' ControlNetModel, strictly and offline.

The header decides the layout and config (layout.py) before any weight is read; the weights are renamed to
diffusers' names and loaded with every key required and none left over, so a file that only half fits is
refused by name instead of running with random layers. A diff ControlNet (a `difference` key: weights stored
as differences from a base model, as some 2023 SD1.5 releases are) gets the model's UNet weights added, as
ComfyUI's DiffControlNetLoader does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel
from safetensors.torch import load_file

from engine.errors import NoodleError, UnsupportedModel
from engine.models.controlnet.layout import ControlNetLayout, read_layout, to_diffusers_names
from engine.models.detect import PICKLE_SUFFIXES, read_pickle_weights, read_shapes

__all__ = ["LoadedControlNet", "build_controlnet", "controlnet_layout", "load_controlnet"]

_SHOWN = 5
_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_embedding_")


@dataclass
class LoadedControlNet:
    """A ControlNet in memory, as the model manager keeps it."""

    key: str
    name: str
    layout: ControlNetLayout
    module: ControlNetModel
    nbytes: int
    load_seconds: float
    used: int = 0


def build_controlnet(layout: ControlNetLayout) -> ControlNetModel:
    """An empty (meta-device) ControlNetModel of the layout's config."""
    with init_empty_weights():
        return ControlNetModel.from_config(dict(layout.config))


def controlnet_layout(path: Path, name: str, *, allow_weights_only_pickle: bool = False) -> ControlNetLayout:
    """The layout of the ControlNet file at `path`, from its safetensors header alone (a pickle, only where the
    owner allowed weights-only loading, is read whole)."""
    return read_layout(read_shapes(path, allow_weights_only_pickle=allow_weights_only_pickle), name)


def _bare_unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own weights in diffusers' names, peft's LoRA layers left out (`x.base_layer.w` is `x.w`)."""
    return {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items()
            if not any(marker in key for marker in _ADAPTER_MARKERS)}


def load_controlnet(path: Path, name: str, key: str, device: torch.device, dtype: torch.dtype,
                    base_unet: torch.nn.Module | None = None, *,
                    allow_weights_only_pickle: bool = False) -> LoadedControlNet:
    """The ControlNet in `path` on `device` in `dtype`; `base_unet` is the model a diff ControlNet adds to."""
    started = time.perf_counter()
    layout = controlnet_layout(path, name, allow_weights_only_pickle=allow_weights_only_pickle)
    if layout.diff and base_unet is None:
        raise UnsupportedModel(f"ControlNet {name!r} is a diff ControlNet (its weights are differences from a base "
                               "model); load it with DiffControlNetLoader, which takes the model to add it to")
    try:
        pickled = path.suffix.lower() in PICKLE_SUFFIXES  # read_shapes refused it unless the owner allowed it
        raw = read_pickle_weights(path) if pickled else load_file(str(path))
    except NoodleError:  # the weights-only loader's refusals say what was wrong already
        raise
    except Exception as err:  # safetensors raises its own error types for broken files
        raise UnsupportedModel(f"ControlNet {name!r} could not be read as safetensors: {err}") from err
    state, _ = to_diffusers_names(raw, name)
    if layout.diff and base_unet is not None:
        base = _bare_unet_state(base_unet)
        for weight_name, weight in state.items():
            if weight_name in base:  # as ComfyUI: only the keys the model has (not the hint block or zero convs)
                state[weight_name] = weight + base[weight_name].to(weight.device, weight.dtype)
    module = build_controlnet(layout)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        found = (("is missing", missing), ("has unexpected", extra), ("has wrong shapes for", wrong))
        parts = [f"{label} {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''}"
                 for label, keys in found if keys]
        raise UnsupportedModel(f"ControlNet {name!r} ({layout.describe()}) does not fit the ControlNet its keys "
                               f"describe: it {'; '.join(parts)}")
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device=device)
    if module.dtype != dtype:  # diffusers warns at every dtype cast, also a needless one
        module = module.to(dtype=dtype)
    module = module.eval().requires_grad_(False)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return LoadedControlNet(key, name, layout, module, nbytes, time.perf_counter() - started)
