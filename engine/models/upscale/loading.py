"""Reading an upscaler file: its architecture from the safetensors header (`read_spec`), its weights into our
module (`load_upscaler`), and `UpscaleModel`, the UPSCALE_MODEL value that travels along a workflow's links.

Only .safetensors: a pickle (.pth, .pt ...), even one the catalog lets through because the owner allowed
weights-only pickles for checkpoints, is refused here with the way to convert it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.detect import PICKLE_SUFFIXES, SUPPORTED, read_header_shapes
from engine.models.upscale.detect import UpscalerSpec, build_module, detect, to_canonical

__all__ = ["UpscaleModel", "load_upscaler", "read_spec", "upscaler_key"]


@dataclass(frozen=True)
class UpscaleModel:
    """UPSCALE_MODEL: a loaded upscaler, the file it came from, and the model manager's key for it."""

    module: nn.Module
    spec: UpscalerSpec
    name: str
    path: Path
    fingerprint: str
    nbytes: int
    load_seconds: float = 0.0

    @property
    def model_key(self) -> str:
        """What the model manager and the node cache know it by: evicting it drops the outputs holding it."""
        return upscaler_key(self.name, self.fingerprint)

    @property
    def scale(self) -> int:
        return self.spec.scale


def upscaler_key(name: str, fingerprint: str) -> str:
    """The key of one upscaler file in one state (its name and `file_fingerprint`)."""
    return f"upscale:{name}:{fingerprint}"


def _what(name: str) -> str:
    return f"upscale model {name!r}"


def _refuse_pickle(path: Path, name: str) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeModelFile(
            f"{_what(name)} is a pickle file ({suffix}), and pickle files can run code when loaded; upscale models "
            f"are loaded from .safetensors only. Convert it once with `noodle convert {path.as_posix()}` (it writes "
            f"{path.stem}.safetensors beside it, which a workflow naming {name!r} then runs on)")


def read_spec(path: Path, name: str) -> UpscalerSpec:
    """The architecture of the upscaler file at `path`, from its header alone (a few KB read)."""
    _refuse_pickle(path, name)
    try:
        shapes = read_header_shapes(path)
    except UnsupportedModel as err:  # its wording ends in the checkpoint families; say upscaler instead
        problem = str(err).removesuffix(f"; {SUPPORTED}")
        raise UnsupportedModel(f"upscale model {problem}") from err
    return detect(shapes, _what(name))


def load_upscaler(path: Path, name: str, fingerprint: str, device: torch.device) -> UpscaleModel:
    """The upscaler at `path` on `device`, in float32 (ComfyUI runs upscale models in float32 too)."""
    spec = read_spec(path, name)
    started = time.perf_counter()
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for broken files
        raise UnsupportedModel(f"{_what(name)} could not be read as safetensors: {err}") from err
    module = build_module(spec)
    # shapes were checked against this very module in detect(): a strict load cannot miss or skip a key
    module.load_state_dict({key: value.float() for key, value in to_canonical(state, _what(name)).items()})
    module.eval().requires_grad_(False).to(device)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    return UpscaleModel(module, spec, name, path, fingerprint, nbytes, time.perf_counter() - started)
