"""A1111 hypernetworks: per attention width, two small MLPs that shift the keys and values of the UNet's attention,
read as ComfyUI 0.3.64's comfy_extras/nodes_hypernetwork.py load_hypernetwork_patch builds them.

An A1111 file is a pickle: {768: (key state dict, value state dict), 1280: (...), "activation_func": "relu",
"is_layer_norm": False, "use_dropout": ..., ...}, each state dict a Sequential's "linear.<i>.weight/bias". Noodle
loads only .safetensors, so the same content is kept flat: tensors "<width>.<0 key | 1 value>.<layer key>", the
options as strings in the file's metadata ("True"/"False" for the flags). `noodle convert` writes that from an
A1111 .pt (`flatten_a1111`); `hypernetwork_file` writes it for tests.

The patch (`HypernetworkPatch`, an "attention_kv" UNet patch: engine/models/unet_hooks.py) does what ComfyUI's
hypernetwork_patch does at attn1 and attn2 alike: for an input of width d with an MLP pair for d,
k + mlp_k(k) * strength and v + mlp_v(v) * strength. One difference: ComfyUI leaves the modules in training mode,
so a file with use_dropout drops 30% of the activations at random on every call (no two runs alike); Noodle runs
them in eval mode, as A1111 does when it generates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from engine.errors import UnsupportedModel
from engine.safetensors_file import save_safetensors

__all__ = ["ACTIVATIONS", "HypernetworkPatch", "build_hypernetwork", "flatten_a1111", "hypernetwork_file",
           "read_hypernetwork"]

# load_hypernetwork_patch's valid_activation ("swish" is torch's Hardswish there, as in A1111)
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign, "mish": torch.nn.Mish,
}
_FLAGS = ("is_layer_norm", "use_dropout", "activate_output", "last_layer_dropout")
_KEY = re.compile(r"^(\d+)\.([01])\.(.+)$")


def _natural(name: str) -> tuple[Any, ...]:
    # "linear.10.weight" after "linear.2.weight": the Sequential's order, whatever order the file lists them in
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def _mlp(weights: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> torch.nn.Sequential:
    """One of a width's two MLPs, layer by layer as load_hypernetwork_patch builds it."""
    activation = options["activation_func"]
    names = sorted((key[: -len(".weight")] for key in weights if key.endswith(".weight")), key=_natural)
    layers: list[torch.nn.Module] = []
    i = 0
    while i < len(names):
        # ComfyUI's positions count layer-norm weights too: reproduced, they decide the activation and dropout
        last, penultimate = i == len(names) - 1, i == len(names) - 2
        weight, bias = weights[f"{names[i]}.weight"], weights.get(f"{names[i]}.bias")
        if weight.ndim != 2 or bias is None:
            raise UnsupportedModel(f"hypernetwork layer {names[i]!r} is not a linear layer with a bias "
                                   f"(weight shape {tuple(weight.shape)})")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight.float(), "bias": bias.float()})
        layers.append(linear)
        if activation != "linear" and (not last or options["activate_output"]):
            layers.append(ACTIVATIONS[activation]())
        if options["is_layer_norm"]:
            i += 1
            if i >= len(names):
                raise UnsupportedModel(f"hypernetwork says is_layer_norm but layer {names[i - 1]!r} has no norm")
            norm_weight, norm_bias = weights[f"{names[i]}.weight"], weights[f"{names[i]}.bias"]
            norm = torch.nn.LayerNorm(norm_weight.shape[0])
            norm.load_state_dict({"weight": norm_weight.float(), "bias": norm_bias.float()})
            layers.append(norm)
        if options["use_dropout"] and not last and (not penultimate or options["last_layer_dropout"]):
            layers.append(torch.nn.Dropout(p=0.3))
        i += 1
    return torch.nn.Sequential(*layers).eval()


@dataclass(frozen=True, eq=False)
class HypernetworkPatch:
    """A hypernetwork at a strength, as an "attention_kv" UNet patch: key(k) and value(v) shift an attention's
    key / value inputs when the hypernetwork has MLPs for their width."""

    kind: ClassVar[str] = "attention_kv"

    name: str
    networks: dict[int, tuple[torch.nn.Module, torch.nn.Module]]
    strength: float

    def to(self, device: torch.device) -> None:
        """Move the MLPs to the UNet's device (kept in float32; inputs are cast to it and back)."""
        for pair in self.networks.values():
            for module in pair:
                module.to(device)

    def _shift(self, x: torch.Tensor, index: int) -> torch.Tensor:
        pair = self.networks.get(int(x.shape[-1]))
        if pair is None:
            return x
        return x + (pair[index](x.float()) * self.strength).to(x.dtype)

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return self._shift(k, 0)

    def value(self, v: torch.Tensor) -> torch.Tensor:
        return self._shift(v, 1)


def _options(metadata: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {"activation_func": metadata.get("activation_func", "linear")}
    for flag in _FLAGS:
        text = metadata.get(flag, "False")
        if text not in ("True", "False", "true", "false"):
            raise UnsupportedModel(f"hypernetwork metadata {flag}={text!r} is not True or False")
        options[flag] = text.lower() == "true"
    if options["activation_func"] not in ACTIVATIONS:
        raise UnsupportedModel(f"hypernetwork activation_func {options['activation_func']!r} is not one ComfyUI "
                               f"loads; known: {', '.join(ACTIVATIONS)}")
    return options


def build_hypernetwork(name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       strength: float) -> HypernetworkPatch:
    """The patch for flat tensors "<width>.<0|1>.<layer key>" and the options in `metadata`."""
    options = _options(metadata)
    parts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise UnsupportedModel(f"hypernetwork {name!r}: key {key!r} is not '<width>.<0|1>.<layer>' (an A1111 "
                                   "hypernetwork converted with `noodle convert`)")
        width, index, layer = int(match[1]), int(match[2]), match[3]
        parts.setdefault(width, {}).setdefault(index, {})[layer] = tensor
    if not parts:
        raise UnsupportedModel(f"hypernetwork {name!r} holds no layers")
    networks = {}
    for width, pair in sorted(parts.items()):
        if set(pair) != {0, 1}:
            raise UnsupportedModel(f"hypernetwork {name!r}: width {width} needs a key (0) and a value (1) network")
        networks[width] = (_mlp(pair[0], options), _mlp(pair[1], options))
    return HypernetworkPatch(name, networks, strength)


def read_hypernetwork(path: Path, name: str, strength: float) -> HypernetworkPatch:
    """A hypernetwork .safetensors file as a patch at `strength`."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as err:  # safetensors raises its own error types for broken files
        raise UnsupportedModel(f"hypernetwork {name!r} could not be read as safetensors: {err}") from err
    return build_hypernetwork(name, tensors, metadata, strength)


def flatten_a1111(data: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """An A1111 hypernetwork as loaded from its .pt (width -> (key, value) state dicts, options) in Noodle's flat
    layout; None when `data` is not one (no integer width holding two state dicts)."""
    if not isinstance(data, dict):
        return None
    tensors: dict[str, torch.Tensor] = {}
    for width, pair in data.items():
        if isinstance(width, int) and isinstance(pair, (list, tuple)) and len(pair) == 2:
            for index, state in enumerate(pair):
                if not isinstance(state, dict):
                    return None
                tensors |= {f"{width}.{index}.{key}": value.detach().contiguous()
                            for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        return None
    metadata = {"activation_func": str(data.get("activation_func", "linear"))}
    metadata |= {flag: str(bool(data.get(flag, False))) for flag in _FLAGS}
    return tensors, metadata


def hypernetwork_file(path: Path, widths: tuple[int, ...], layer_structure: tuple[float, ...] = (1, 2, 1), *,
                      activation: str = "relu", layer_norm: bool = False, seed: int = 0, scale: float = 0.1) -> Path:
    """Write a random hypernetwork in Noodle's layout (A1111's HypernetworkModule layer names): for tests."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for width in widths:
        for index in (0, 1):
            position = 0
            for a, b in zip(layer_structure, layer_structure[1:]):
                inner, outer = int(width * a), int(width * b)
                prefix = f"{width}.{index}.linear.{position}"
                tensors[f"{prefix}.weight"] = torch.randn(outer, inner, generator=generator) * scale
                tensors[f"{prefix}.bias"] = torch.randn(outer, generator=generator) * scale
                position += 1
                if activation != "linear":
                    position += 1
                if layer_norm:
                    prefix = f"{width}.{index}.linear.{position}"
                    tensors[f"{prefix}.weight"] = 1 + torch.randn(outer, generator=generator) * scale
                    tensors[f"{prefix}.bias"] = torch.randn(outer, generator=generator) * scale
                    position += 1
    metadata = {"activation_func": activation, "is_layer_norm": str(layer_norm), "use_dropout": "False",
                "activate_output": "False", "last_layer_dropout": "False"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, str(path), metadata=metadata)
    return path
