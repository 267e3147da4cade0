"""Small latent nodes: LatentComposite, LatentAdd, LatentSubtract, LatentMultiply, LatentBlend, LatentFromBatch,
LatentCrop, LatentFlip, LatentRotate, SaveLatent and LoadLatent, with ComfyUI 0.3.64's names, ranges and math
(nodes.py, comfy_extras/nodes_latent.py).

As in ComfyUI, each node keeps the first latent's batch index and noise mask (its `samples.copy()`); only
LatentFromBatch picks them per item. `.latent` files are safetensors holding `latent_tensor` and the empty
`latent_format_version_0` marker, so files move between ComfyUI and Noodle both ways.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.disk import DiskFull, check_free_space, disk_full_message, is_disk_full
from engine.errors import LimitExceeded, UnsafeModelFile
from engine.input_folder import LATENT_SUFFIXES
from engine.models.paths import FolderLookup, safe_join
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, Output, RunContext, Socket, Text, register
from engine.nodes.images import save_path
from engine.nodes.latents import composite, repeat_to_batch, size_problems, upscale_latent
from engine.safetensors_file import save_safetensors
from engine.values import Latent

LATENT_KEY, VERSION_KEY = "latent_tensor", "latent_format_version_0"
OLD_FORMAT_SCALE = 1.0 / 0.18215  # a file without the version marker holds SD1 latents scaled for the UNet
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
FLIPS = ("x-axis: vertically", "y-axis: horizontally")
_MAX_HEADER = 1 << 20  # a .latent header is a few hundred bytes; a bigger one is not a latent file


def reshape_latent_to(target: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """comfy_extras/nodes_latent.py reshape_latent_to: resized (bilinear, centre crop) and repeated to target."""
    if latent.shape[1] != target.shape[1]:
        raise ValueError(f"the second latent has {latent.shape[1]} channels and the first {target.shape[1]}: "
                         "combine latents of the same model family")
    if latent.shape[1:] != target.shape[1:]:
        latent = upscale_latent(latent, target.shape[-1], target.shape[-2], "bilinear", "center")
    return repeat_to_batch(latent.to(target.device, target.dtype), target.shape[0])


@register
class LatentComposite(Node):
    """Paste one latent onto another at a pixel offset, its edges feathered into the destination."""

    CATEGORY: ClassVar[str] = "latent"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples_to: Latent = Socket("LATENT")
    samples_from: Latent = Socket("LATENT")
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    feather: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        to, source = self.samples_to.samples, self.samples_from.samples
        if to.shape[1] != source.shape[1]:
            raise ValueError(f"samples_from has {source.shape[1]} channels and samples_to {to.shape[1]}: "
                             "composite latents of the same model family")
        mask = self._feather_mask(to, source)
        out = composite(to, source, self.x, self.y, mask, 8, False)
        return (dataclasses.replace(self.samples_to, samples=out),)

    def _feather_mask(self, to: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
        """ComfyUI's ramp: the t-th cell in from a side inside the destination weighs (t + 1) / feather."""
        feather, x, y = self.feather // 8, self.x // 8, self.y // 8
        if feather == 0:
            return None
        shown_h = max(0, min(source.shape[2], to.shape[2] - y))
        shown_w = max(0, min(source.shape[3], to.shape[3] - x))
        mask = torch.ones(1, source.shape[2], source.shape[3], dtype=to.dtype)
        shown = mask[:, :shown_h, :shown_w]  # a view: the part of the source that lands on the destination
        # the same slices as ComfyUI's, negative ends included: a feather wider than the source wraps as there
        for t in range(feather):
            ramp = (1.0 / feather) * (t + 1)
            if y != 0:
                shown[:, t:t + 1] *= ramp
            if y + shown_h < to.shape[2]:
                shown[:, shown_h - 1 - t:shown_h - t] *= ramp
            if x != 0:
                shown[:, :, t:t + 1] *= ramp
            if x + shown_w < to.shape[3]:
                shown[:, :, shown_w - 1 - t:shown_w - t] *= ramp
        return mask


@register
class LatentAdd(Node):
    """samples1 + samples2 (the second resized and repeated to the first)."""

    CATEGORY: ClassVar[str] = "latent/advanced"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples1: Latent = Socket("LATENT")
    samples2: Latent = Socket("LATENT")

    def run(self, ctx: RunContext) -> tuple[Latent]:
        s1 = self.samples1.samples
        return (dataclasses.replace(self.samples1, samples=s1 + reshape_latent_to(s1, self.samples2.samples)),)


@register
class LatentSubtract(Node):
    """samples1 - samples2 (the second resized and repeated to the first)."""

    CATEGORY: ClassVar[str] = "latent/advanced"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples1: Latent = Socket("LATENT")
    samples2: Latent = Socket("LATENT")

    def run(self, ctx: RunContext) -> tuple[Latent]:
        s1 = self.samples1.samples
        return (dataclasses.replace(self.samples1, samples=s1 - reshape_latent_to(s1, self.samples2.samples)),)


@register
class LatentMultiply(Node):
    """A latent times a constant."""

    CATEGORY: ClassVar[str] = "latent/advanced"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    multiplier: float = Field(1.0, ge=-10.0, le=10.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        return (dataclasses.replace(self.samples, samples=self.samples.samples * self.multiplier),)


@register
class LatentBlend(Node):
    """samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 resized (bicubic, centre) if needed."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples1: Latent = Socket("LATENT")
    samples2: Latent = Socket("LATENT")
    blend_factor: float = Field(0.5, ge=0.0, le=1.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        s1, s2 = self.samples1.samples, self.samples2.samples
        if s1.shape[1] != s2.shape[1]:
            raise ValueError(f"samples2 has {s2.shape[1]} channels and samples1 {s1.shape[1]}: "
                             "blend latents of the same model family")
        if s1.shape != s2.shape:  # ComfyUI resizes only the sides; the batches must then broadcast
            s2 = upscale_latent(s2, s1.shape[3], s1.shape[2], "bicubic", "center")
        if s1.shape[0] != s2.shape[0] and 1 not in (s1.shape[0], s2.shape[0]):
            raise ValueError(f"samples1 has {s1.shape[0]} latents and samples2 {s2.shape[0]}: blend batches of "
                             "the same size, or one latent with a batch")
        blended = s1 * self.blend_factor + s2.to(s1.device, s1.dtype) * (1 - self.blend_factor)
        return (dataclasses.replace(self.samples1, samples=blended),)


@register
class LatentFromBatch(Node):
    """Take `length` latents from a batch, starting at `batch_index`; they keep their noise."""

    CATEGORY: ClassVar[str] = "latent/batch"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    batch_index: int = Field(0, ge=0, le=63)
    length: int = Field(1, ge=1, le=64)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        samples = self.samples.samples
        # past the end takes the last latent, as ComfyUI clamps both
        start = min(samples.shape[0] - 1, self.batch_index)
        length = min(samples.shape[0] - start, self.length)
        mask = self.samples.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = repeat_to_batch(mask, samples.shape[0])[start:start + length].clone()
        # the picked latents keep their place in the original batch, so each gets the noise it had there
        index = self.samples.batch_index
        index = tuple(range(start, start + length)) if index is None else tuple(index[start:start + length])
        return (Latent(samples[start:start + length].clone(), index, mask),)


@register
class LatentCrop(Node):
    """Cut a width x height pixel area at (x, y) out of a latent."""

    CATEGORY: ClassVar[str] = "latent/transform"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    width: int = Field(512, ge=64, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    height: int = Field(512, ge=64, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})

    def run(self, ctx: RunContext) -> tuple[Latent]:
        samples = self.samples.samples
        left, top = crop_corner(self.x, self.y, samples.shape[3], samples.shape[2])
        cut = samples[:, :, top:top + self.height // 8, left:left + self.width // 8]
        return (dataclasses.replace(self.samples, samples=cut),)


def crop_corner(x: int, y: int, cells_w: int, cells_h: int) -> tuple[int, int]:
    """LatentCrop's corner in cells: at most 8 cells (64 pixels) before the far side, as ComfyUI keeps it."""
    # ComfyUI's min(x // 8, w - 8) goes negative on a latent under 8 cells; 0 is where it then means to start
    return max(0, min(x // 8, cells_w - 8)), max(0, min(y // 8, cells_h - 8))


@register
class LatentFlip(Node):
    """Mirror a latent: x-axis flips top and bottom, y-axis left and right."""

    CATEGORY: ClassVar[str] = "latent/transform"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    flip_method: str = Choice(FLIPS)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        dim = 2 if self.flip_method.startswith("x") else 3
        return (dataclasses.replace(self.samples, samples=torch.flip(self.samples.samples, dims=[dim])),)


@register
class LatentRotate(Node):
    """Turn a latent clockwise by quarter turns."""

    CATEGORY: ClassVar[str] = "latent/transform"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    samples: Latent = Socket("LATENT")
    rotation: str = Choice(ROTATIONS)

    def run(self, ctx: RunContext) -> tuple[Latent]:
        turns = ROTATIONS.index(self.rotation)
        # dims (W, H), as ComfyUI: a clockwise turn; the noise mask stays as it was, as there
        return (dataclasses.replace(self.samples, samples=torch.rot90(self.samples.samples, k=turns, dims=[3, 2])),)


@register
class SaveLatent(Node):
    """Save a latent to the output folder as a ComfyUI `.latent` file (safetensors), with the workflow inside."""

    CATEGORY: ClassVar[str] = "_for_testing"
    OUTPUT_NODE: ClassVar[bool] = True

    samples: Latent = Socket("LATENT")
    filename_prefix: str = Text("latents/ComfyUI")

    def run(self, ctx: RunContext) -> Output:
        folder, stem, counter = save_path(ctx.output_dir, self.filename_prefix, suffix=".latent")
        samples = self.samples.samples.detach().to("cpu").contiguous()
        tensors = {LATENT_KEY: samples, VERSION_KEY: torch.tensor([])}
        metadata = {"prompt": json.dumps(ctx.prompt)}
        need = samples.numel() * samples.element_size() + len(metadata["prompt"]) + 1024
        check_free_space(ctx.output_dir, ctx.limits.min_free_disk_mb, need, label=f"{ctx.output_dir.name}/")
        name = f"{stem}_{counter:05}_.latent"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            save_safetensors(tensors, folder / name, metadata=metadata)
        except OSError as err:
            (folder / name).unlink(missing_ok=True)
            if is_disk_full(err):
                raise DiskFull(disk_full_message(err, f"{ctx.output_dir.name}/")) from err
            raise
        subfolder = folder.relative_to(ctx.output_dir.resolve()).as_posix()
        return Output((), {"latents": [{"filename": name, "subfolder": "" if subfolder == "." else subfolder,
                                        "type": "output"}]})


def latent_path(input_dir: Path, name: str) -> Path:
    """A `.latent` file in the input folder, through the same safe join as LoadImage's images."""
    if not name.lower().endswith(LATENT_SUFFIXES):
        raise UnsafeModelFile(f"latent {name!r} is not a .latent file; LoadLatent reads ComfyUI's .latent "
                              "(safetensors) files from the input folder")

    def listing() -> list[str]:
        if not input_dir.is_dir():
            return []
        return sorted(p.relative_to(input_dir).as_posix() for p in input_dir.rglob("*")
                      if p.is_file() and p.suffix.lower() in LATENT_SUFFIXES)

    return safe_join(input_dir, name, what="input latent", listing=listing)


def latent_file_shape(path: Path) -> tuple[int, ...] | None:
    """`latent_tensor`'s shape from a safetensors header, without reading the tensor; None when not there."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return None
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            return None
        try:
            header = json.loads(file.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    entry = header.get(LATENT_KEY) if isinstance(header, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    return tuple(shape) if isinstance(shape, list) and all(isinstance(n, int) for n in shape) else None


@register
class LoadLatent(Node):
    """Load a ComfyUI `.latent` file (safetensors) from the input folder."""

    CATEGORY: ClassVar[str] = "_for_testing"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("LATENT",)

    # a .latent file of the input folder, listed as a COMBO as ComfyUI does: a name not there is refused at
    # validation, and a Ray worker is sent the file as it is sent LoadImage's
    latent: str = Choice("input_latents")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # ComfyUI's IS_CHANGED hashes the file: a new file under the same name loads again
        name = inputs["latent"]
        if not isinstance(name, str) or not name.lower().endswith(LATENT_SUFFIXES):
            return None  # the run refuses it
        return hashlib.sha256(lookup.resolve("input_latents", name).read_bytes()).hexdigest()

    def run(self, ctx: RunContext) -> tuple[Latent]:
        path = latent_path(ctx.input_dir, self.latent)
        shape = latent_file_shape(path)
        if shape is None or len(shape) != 4:
            raise UnsafeModelFile(f"latent {self.latent!r} is not a ComfyUI .latent file: it needs a safetensors "
                                  f"header with a 4-dimensional {LATENT_KEY!r} (save one with SaveLatent)")
        batch, _, cells_h, cells_w = shape
        problems = size_problems(cells_w * 8, cells_h * 8, batch, ctx.limits)
        if problems:
            raise LimitExceeded(f"latent {self.latent!r} is {batch} x {cells_w * 8}x{cells_h * 8}: {problems[0][1]}")
        try:
            tensors = load_file(path, device="cpu")
        except SafetensorError as err:
            raise UnsafeModelFile(f"latent {self.latent!r} is not a readable safetensors file ({err}); LoadLatent "
                                  "reads only ComfyUI's .latent (safetensors) files") from err
        multiplier = 1.0 if VERSION_KEY in tensors else OLD_FORMAT_SCALE
        return (Latent(tensors[LATENT_KEY].float() * multiplier),)

