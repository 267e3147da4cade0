"""Which upscaler a file holds, read from its keys and tensor shapes alone (no weights needed).

`detect(shapes)` names the key layout (old ESRGAN, Real-ESRGAN/BasicSR, BSRGAN, or compact SRVGG), renames
the keys to our modules' names (`to_canonical`), reads the hyperparameters off the shapes, then builds the
module on the meta device and compares every key and shape, so a file that only looks like a known layout is
refused here, naming what does not fit, rather than half-loaded. The model manager and the cost check
(engine/cost/, via `read_spec`) both call it on a safetensors header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from engine.errors import UnsupportedModel
from engine.models.upscale.compact import SRVGGNetCompact
from engine.models.upscale.rrdb import RRDBNet

__all__ = ["KNOWN", "Layout", "UpscalerSpec", "build_module", "detect", "to_canonical"]

Layout = Literal["esrgan", "real-esrgan", "bsrgan", "compact"]
KNOWN = ("Noodle loads ESRGAN/RRDBNet upscalers (old ESRGAN, Real-ESRGAN and BSRGAN key layouts) and "
         "Real-ESRGAN compact (SRVGGNetCompact) ones, as .safetensors")
LAYOUT_NAMES: dict[Layout, str] = {"esrgan": "old ESRGAN layout", "real-esrgan": "Real-ESRGAN layout",
                                   "bsrgan": "BSRGAN layout", "compact": "compact SRVGG layout"}
# Training scripts save weights under one of these; a converted .pth keeps them.
WRAPPER_PREFIXES = ("params_ema.", "params.", "module.")
T = TypeVar("T")


@dataclass(frozen=True)
class UpscalerSpec:
    """An upscaler's architecture as read from its shapes: enough to build the module."""

    family: Literal["rrdb", "compact"]
    layout: Layout
    scale: int  # each side grows this many times
    in_channels: int
    out_channels: int
    features: int
    blocks: int  # RRDB blocks, or the compact body's hidden convs
    growth: int = 0  # RRDB dense-block growth channels (32 in every published model)
    ups: int = 0  # RRDB nearest-x2 stages
    shuffle: int = 1  # Real-ESRGAN x2/x1: the input is pixel-unshuffled by this factor first

    def describe(self) -> str:
        """`RRDBNet x4 (Real-ESRGAN layout, 23 blocks, 64 features)`, for messages and meta."""
        name = "RRDBNet" if self.family == "rrdb" else "SRVGGNetCompact"
        unit = "block" if self.family == "rrdb" else "conv"
        parts = f"{self.blocks} {unit}{'' if self.blocks == 1 else 's'}, {self.features} features"
        channels = ("" if self.in_channels == 3 == self.out_channels
                    else f", {self.in_channels}->{self.out_channels} channels")
        return f"{name} x{self.scale} ({LAYOUT_NAMES[self.layout]}, {parts}{channels})"


def build_module(spec: UpscalerSpec) -> nn.Module:
    """An untrained module of `spec`'s architecture, on the current default device."""
    if spec.family == "rrdb":
        return RRDBNet(in_channels=spec.in_channels, out_channels=spec.out_channels, features=spec.features,
                       blocks=spec.blocks, growth=spec.growth, ups=spec.ups, shuffle=spec.shuffle)
    return SRVGGNetCompact(channels=spec.in_channels, features=spec.features, convs=spec.blocks, scale=spec.scale)


def detect(shapes: Mapping[str, Sequence[int]], what: str = "upscale model") -> UpscalerSpec:
    """The architecture of a state dict given as key -> shape; UnsupportedModel, naming what was found, if none.

    `what` names the file in messages ("upscale model '4x-foo.safetensors'").
    """
    layout, names = _rename(shapes.keys(), what)
    canon = {names.get(key, key): tuple(int(d) for d in shape) for key, shape in shapes.items()}
    spec = _rrdb_spec(canon, layout, what) if layout != "compact" else _compact_spec(canon, what)
    _check_shapes(spec, canon, what)
    return spec


def to_canonical(state: Mapping[str, T], what: str = "upscale model") -> dict[str, T]:
    """`state` with its keys renamed to our modules' names (the layout is detected from the keys)."""
    _, names = _rename(state.keys(), what)
    return {names.get(key, key): value for key, value in state.items()}


# -- layouts ---------------------------------------------------------------------------------------

_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_OLD_SEQ = re.compile(r"model\.(\d+)\.(weight|bias)")
_BSR_RDB = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)")
_BSR_UP = re.compile(r"upconv(\d+)\.(weight|bias)")
_BSR_PLAIN = {"trunk_conv": "conv_body", "HRconv": "conv_hr", "conv_first": "conv_first", "conv_last": "conv_last"}


def _rename(keys: Iterable[str], what: str) -> tuple[Layout, dict[str, str]]:
    """The layout of `keys` and a map from each file key we understand to our module's name for it."""
    keys = list(keys)
    prefix = next((p for p in WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
    bare = {key: key.removeprefix(prefix) for key in keys}
    present = set(bare.values())
    if any(".conv1x1." in key for key in present):
        raise UnsupportedModel(f"{what} is an ESRGAN+ model (its dense blocks have conv1x1 paths); {KNOWN}")
    if {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= present:
        layout: Layout = "esrgan"
        names = _old_esrgan_names(present, what)
    elif {"conv_first.weight", "body.0.rdb1.conv1.weight"} <= present:
        layout, names = "real-esrgan", {key: key for key in present}
    elif {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight"} <= present:
        layout, names = "bsrgan", {key: _bsrgan_name(key) for key in present}
    elif {"body.0.weight", "body.1.weight"} <= present and not any(".rdb" in key for key in present):
        layout, names = "compact", {key: key for key in present}
    else:
        raise UnsupportedModel(_unknown_layout(what, sorted(present)))
    return layout, {key: names[plain] for key, plain in bare.items() if plain in names}


def _old_esrgan_names(keys: set[str], what: str) -> dict[str, str]:
    """ESRGAN's original `model.N` sequence: conv, shortcut(trunk), [upsample, conv, act] x ups, conv, act, conv."""
    sequence = {int(m[1]) for key in keys if (m := _OLD_SEQ.fullmatch(key))}
    length = max(sequence | {1}) + 1
    if (length - 5) % 3:
        raise UnsupportedModel(f"{what} has ESRGAN keys, but its layers model.0..model.{length - 1} do not form "
                               "ESRGAN's sequence (conv, trunk, [upsample, conv, act] per x2, conv, act, conv); "
                               f"{KNOWN}")
    ups = (length - 5) // 3
    top = {0: "conv_first", 3 * ups + 2: "conv_hr", 3 * ups + 4: "conv_last"}
    top |= {3 * n: f"conv_up{n}" for n in range(1, ups + 1)}
    trunk_index = max((int(m[1]) for key in keys if (m := _OLD_TRUNK.fullmatch(key))), default=-1)
    names: dict[str, str] = {}
    for key in keys:
        if m := _OLD_RDB.fullmatch(key):
            names[key] = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        elif (m := _OLD_TRUNK.fullmatch(key)) and int(m[1]) == trunk_index:
            names[key] = f"conv_body.{m[2]}"  # the trunk's last entry is its closing conv, after the blocks
        elif (m := _OLD_SEQ.fullmatch(key)) and int(m[1]) in top:
            names[key] = f"{top[int(m[1])]}.{m[2]}"
    return names


def _bsrgan_name(key: str) -> str:
    if m := _BSR_RDB.fullmatch(key):
        return f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
    if m := _BSR_UP.fullmatch(key):
        return f"conv_up{m[1]}.{m[2]}"
    module, _, param = key.partition(".")
    return f"{_BSR_PLAIN[module]}.{param}" if module in _BSR_PLAIN else key


# -- hyperparameters from shapes ---------------------------------------------------------------------

def _shape(canon: Mapping[str, tuple[int, ...]], key: str, dims: int, what: str) -> tuple[int, ...]:
    shape = canon.get(key)
    if shape is None or len(shape) != dims:
        found = "missing" if shape is None else f"of shape {list(shape)}"
        raise UnsupportedModel(f"{what}: {key} is {found}, where a {dims}-d tensor was expected; {KNOWN}")
    return shape


def _rrdb_spec(canon: Mapping[str, tuple[int, ...]], layout: Layout, what: str) -> UpscalerSpec:
    features, first_in = _shape(canon, "conv_first.weight", 4, what)[:2]
    out_channels = _shape(canon, "conv_last.weight", 4, what)[0]
    growth = _shape(canon, "body.0.rdb1.conv1.weight", 4, what)[0]
    blocks = len({key.split(".")[1] for key in canon if key.startswith("body.")})
    ups = len({key.split(".")[0] for key in canon if re.fullmatch(r"conv_up\d+\.(weight|bias)", key)})
    # Real-ESRGAN x2 / x1 fold 2x2 / 4x4 pixels into channels before the first conv
    shuffle = next((f for f in (2, 4) if first_in == out_channels * f * f), 1)
    in_channels = first_in // (shuffle * shuffle)
    if 2**ups % shuffle:
        raise UnsupportedModel(f"{what}: an RRDBNet with {ups} x2 stages cannot undo a {shuffle}x pixel unshuffle "
                               f"({first_in} input channels for {out_channels} output channels); {KNOWN}")
    return UpscalerSpec("rrdb", layout, 2**ups // shuffle, in_channels, out_channels, features, blocks, growth,
                        ups, shuffle)


def _compact_spec(canon: Mapping[str, tuple[int, ...]], what: str) -> UpscalerSpec:
    indices = {int(m[1]) for key in canon if (m := re.fullmatch(r"body\.(\d+)\.(weight|bias)", key))}
    length = max(indices) + 1
    if length < 3 or (length - 3) % 2:
        raise UnsupportedModel(f"{what}: body.0..body.{length - 1} is not a compact SRVGG stack (conv, PReLU, "
                               f"[conv, PReLU] per hidden conv, conv); {KNOWN}")
    features, channels = _shape(canon, "body.0.weight", 4, what)[:2]
    last = _shape(canon, f"body.{length - 1}.weight", 4, what)[0]
    scale = math.isqrt(last // channels) if last % channels == 0 else 0
    if scale < 1 or scale * scale * channels != last:
        raise UnsupportedModel(f"{what}: the last conv makes {last} channels, which is not {channels} channels "
                               "times a square scale; a compact SRVGG upscaler's residual needs equal input and "
                               f"output channels; {KNOWN}")
    return UpscalerSpec("compact", "compact", scale, channels, channels, features, (length - 3) // 2)


def _check_shapes(spec: UpscalerSpec, canon: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Every key and shape of the module `spec` builds must be in the file, and nothing else."""
    with torch.device("meta"):
        wanted = {key: tuple(value.shape) for key, value in build_module(spec).state_dict().items()}
    missing = sorted(set(wanted) - set(canon))
    extra = sorted(set(canon) - set(wanted))
    wrong = [key for key in sorted(set(wanted) & set(canon)) if wanted[key] != canon[key]]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if extra:
        problems.append(f"unexpected {_few(extra)}")
    if wrong:
        problems.append("wrong shapes: " + ", ".join(f"{key} is {list(canon[key])}, needs {list(wanted[key])}"
                                                      for key in wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
    if problems:
        raise UnsupportedModel(f"{what} looks like an {spec.describe()}, but its tensors do not fit one: "
                               f"{'; '.join(problems)} (names as in the {LAYOUT_NAMES[spec.layout]}, renamed)")


def _few(keys: Sequence[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _unknown_layout(what: str, keys: Sequence[str]) -> str:
    """Say what a file with no known layout seems to be, from its keys."""
    if not keys:
        return f"{what} holds no tensors; {KNOWN}"
    hint = ""
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for key in keys):
        hint = " It looks like a Stable Diffusion checkpoint: those go in models/checkpoints."
    elif any(key.startswith(("lora_unet_", "lora_te")) for key in keys):
        hint = " It looks like a LoRA: those go in models/loras."
    elif any("residual_group" in key or ".attn." in key for key in keys):
        hint = " Its keys look like a transformer upscaler (SwinIR, HAT, DAT and the like), which Noodle lacks."
    return (f"{what} has no key layout Noodle knows: {len(keys)} tensors, starting {_few(list(keys))}; "
            f"{KNOWN}.{hint}")
