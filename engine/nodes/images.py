"""Image nodes: LoadImage, SaveImage, PreviewImage, ImageScale, ImageCompositeMasked and ImagePadForOutpaint,
with ComfyUI's names and defaults."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from engine.disk import DiskFull, check_free_space, disk_full_message, is_disk_full
from engine.errors import LimitExceeded, UnsafeModelFile
from engine.images_io import decode_still
from engine.nodes.latents import center_crop, composite, size_problems
from engine.models.paths import FolderLookup
from engine.nodes.base import MAX_RESOLUTION, Choice, Node, Output, RunContext, Socket, Text, register
from engine.recipe import image_parameters
from engine.pngmeta import save_png
from engine.settings import Limits
from engine.values import ImageBatch, Mask

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: [1, H, W, 3] float 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


def tensor_to_pils(pixels: torch.Tensor) -> list[Image.Image]:
    """IMAGE [B, H, W, C] -> PIL images; 255*x clipped and truncated to uint8, as ComfyUI's SaveImage does."""
    array = (255.0 * pixels.detach().float().cpu().numpy()).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(item) for item in array]


@register
class LoadImage(Node):
    """Load one still PNG, JPEG or WebP from the input folder as IMAGE and its alpha channel as MASK."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE", "MASK")

    image: str = Choice("input")

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any], lookup: FolderLookup) -> str | None:
        # ComfyUI's IS_CHANGED hashes the file: a new file under the same name runs again
        return hashlib.sha256(lookup.resolve("input", inputs["image"]).read_bytes()).hexdigest()

    def run(self, ctx: RunContext) -> tuple[ImageBatch, Mask]:
        # the same checks and decoding as an /imagine upload (engine/images_io.py): one still frame, upright
        limits = ctx.limits
        still = decode_still(ctx.models.resolve("input", self.image), f"input {self.image!r}",
                             max_bytes=limits.max_input_image_bytes, max_side=limits.max_side,
                             max_pixels=limits.max_pixels)
        pixels = torch.from_numpy(still.rgb)[None]
        if still.alpha is None:
            mask = torch.zeros(1, 64, 64)  # ComfyUI's LoadImage gives a 64x64 empty mask to an opaque image
        else:
            mask = 1.0 - torch.from_numpy(still.alpha)[None]  # ComfyUI's MASK is 1 where transparent
        return ImageBatch(pixels), Mask(mask)


@register
class ImageCompositeMasked(Node):
    """Paste one image onto another at a pixel offset, through an optional mask."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    destination: ImageBatch = Socket("IMAGE")
    source: ImageBatch = Socket("IMAGE")
    x: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    y: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    resize_source: bool = False
    mask: Mask | None = Socket("MASK", optional=True)

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        destination, source = self.destination.pixels, self.source.pixels
        if source.shape[-1] > destination.shape[-1]:  # node_helpers.image_alpha_fix: the source's alpha goes
            source = source[..., :destination.shape[-1]]
        elif source.shape[-1] < destination.shape[-1]:
            raise ValueError(f"the source image has {source.shape[-1]} channels and the destination "
                             f"{destination.shape[-1]}; composite images with the same channels")
        mask = None if self.mask is None else self.mask.values
        out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), self.x, self.y, mask, 1,
                        self.resize_source)
        return (ImageBatch(out.movedim(1, -1)),)


@register
class ImagePadForOutpaint(Node):
    """Pad an image with grey for outpainting, with a mask of the new area feathered into the old."""

    CATEGORY: ClassVar[str] = "image"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE", "MASK")

    image: ImageBatch = Socket("IMAGE")
    left: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    top: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    right: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    bottom: int = Field(0, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 8})
    feathering: int = Field(40, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})

    def run(self, ctx: RunContext) -> tuple[ImageBatch, Mask]:
        pixels = self.image.pixels
        batch, height, width, channels = pixels.shape
        new_h, new_w = height + self.top + self.bottom, width + self.left + self.right
        problems = size_problems(new_w, new_h, batch, ctx.limits)
        if problems:
            raise LimitExceeded(f"padding the {width}x{height} image gives {new_w}x{new_h}: {problems[0][1]}")
        padded = torch.full((batch, new_h, new_w, channels), 0.5, dtype=torch.float32)
        padded[:, self.top:self.top + height, self.left:self.left + width] = pixels
        mask = torch.ones(new_h, new_w)
        mask[self.top:self.top + height, self.left:self.left + width] = self._feather(height, width)
        return ImageBatch(padded), Mask(mask[None])

    def _feather(self, height: int, width: int) -> torch.Tensor:
        """The mask over the old image: 0, rising as ((f - d) / f)^2 within f pixels of a padded side."""
        f = self.feathering
        if f == 0 or f * 2 >= height or f * 2 >= width:  # ComfyUI feathers only an image over twice as big
            return torch.zeros(height, width)
        rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
        cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
        # distance to each padded side; a side not padded counts as far away (the image's own size)
        sides = [rows if self.top else torch.full_like(rows, height),
                 height - rows if self.bottom else torch.full_like(rows, height),
                 cols if self.left else torch.full_like(cols, width),
                 width - cols if self.right else torch.full_like(cols, width)]
        distance = torch.stack(sides).amin(0)
        # in float64 then stored as float32, as ComfyUI's per-pixel Python floats are
        return torch.where(distance < f, ((f - distance) / f) ** 2, 0.0).float()


def save_path(output_dir: Path, prefix: str, width: int = 0, height: int = 0,
              suffix: str = ".png") -> tuple[Path, str, int]:
    """Folder, file stem and next counter for a prefix, as ComfyUI's get_save_image_path."""
    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    folder = (output_dir / prefix).parent.resolve()
    root = output_dir.resolve()
    if folder != root and root not in folder.parents:
        raise UnsafeModelFile(f"filename_prefix {prefix!r} leaves the output folder; use a relative name such as "
                              "'noodle' or 'portraits/noodle'")
    stem = Path(prefix).name
    pattern = re.compile(re.escape(stem) + r"_(\d+)_?" + re.escape(suffix) + "$")
    found = folder.glob(f"{stem}_*{suffix}") if folder.is_dir() else []
    counters = [int(m.group(1)) for p in found if (m := pattern.match(p.name))]
    return folder, stem, max(counters, default=0) + 1


MAX_NAME_BYTES = 200  # a file name part of a prefix: 255 on most disks, less the counter and the .part suffix


def prefix_problems(prefix: str) -> list[tuple[str, str]]:
    """Why a SaveImage filename_prefix cannot name files in the output folder, found at validation (save_path
    would find the escapes only after sampling, and the disk the rest, with an error of its own)."""
    shown = prefix if len(prefix) <= 60 else prefix[:59] + "…"
    clean = prefix.replace("%width%", "1").replace("%height%", "1")
    if "\x00" in clean:
        return [("filename_prefix", f"filename_prefix {shown!r} holds a NUL character, which no file name can")]
    path = PurePosixPath(clean)  # as save_path reads it: the folder is its parent, the file stem its name
    if not path.name:
        return [("filename_prefix", f"filename_prefix {shown!r} names no file; use a name such as 'noodle' or "
                                    "'portraits/noodle'")]
    folder = posixpath.normpath(str(path.parent))
    if path.is_absolute() or folder == ".." or folder.startswith("../"):
        return [("filename_prefix", f"filename_prefix {shown!r} leaves the output folder; use a relative name such "
                                    "as 'noodle' or 'portraits/noodle'")]
    longest = max(len(part.encode("utf-8")) for part in path.parts)
    if longest > MAX_NAME_BYTES:
        return [("filename_prefix", f"filename_prefix {shown!r} has a name of {longest} bytes; a disk takes about "
                                    f"255, so keep each part under {MAX_NAME_BYTES}")]
    return []


def save_images(ctx: RunContext, pixels: torch.Tensor, prefix: str, kind: str, folder_root: Path) -> Output:
    """Write a batch as `{prefix}_{counter:05}_.png` with its recipe in text chunks."""
    images = tensor_to_pils(pixels)
    folder, stem, counter = save_path(folder_root, prefix, images[0].width, images[0].height)
    texts = {"prompt": json.dumps(ctx.prompt)}
    parameters = image_parameters(ctx, images[0].width, images[0].height)
    if parameters:
        texts["parameters"] = parameters
    # a PNG is at most about its raw pixels plus the text chunks: refuse before writing what would not fit
    text_bytes = sum(len(value.encode()) for value in texts.values())
    need = sum(image.width * image.height * len(image.getbands()) + text_bytes for image in images)
    check_free_space(folder_root, ctx.limits.min_free_disk_mb, need, label=f"{ctx.output_dir.name}/")
    results: list[dict[str, str]] = []
    written: list[Path] = []
    try:
        for image in images:
            while True:  # another writer of the folder (an engine worker on Ray) may take a counter meanwhile
                name = f"{stem}_{counter:05}_.png"
                try:
                    save_png(image, folder / name, texts, exclusive=True)
                    break
                except FileExistsError:
                    counter += 1
            written.append(folder / name)
            subfolder = folder.relative_to(folder_root.resolve()).as_posix()
            results.append({"filename": name, "subfolder": "" if subfolder == "." else subfolder, "type": kind})
            counter += 1
    except BaseException as err:
        # all of the batch or none of it: the job fails, so its first images would be files nobody refers to
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(err, OSError) and is_disk_full(err):
            raise DiskFull(disk_full_message(err, f"{ctx.output_dir.name}/")) from err
        raise
    return Output((), {"images": results})


@register
class SaveImage(Node):
    """Save images to the output folder as PNG with the workflow and A1111 parameters inside."""

    CATEGORY: ClassVar[str] = "image"
    OUTPUT_NODE: ClassVar[bool] = True

    images: ImageBatch = Socket("IMAGE")
    filename_prefix: str = Text("ComfyUI")

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return prefix_problems(values.get("filename_prefix", "ComfyUI"))

    def run(self, ctx: RunContext) -> Output:
        return save_images(ctx, self.images.pixels, self.filename_prefix, "output", ctx.output_dir)


@register
class PreviewImage(Node):
    """Save images to the temp folder for a quick look."""

    CATEGORY: ClassVar[str] = "image"
    OUTPUT_NODE: ClassVar[bool] = True

    images: ImageBatch = Socket("IMAGE")

    def run(self, ctx: RunContext) -> Output:
        return save_images(ctx, self.images.pixels, f"ComfyUI_temp_{ctx.prompt_id[:5]}", "temp", ctx.temp_dir)


@register
class SaveImageWebsocket(Node):
    """Hand images to the caller: ComfyUI streams them over its websocket; Noodle saves them as PreviewImage does."""

    CATEGORY: ClassVar[str] = "api/image"
    OUTPUT_NODE: ClassVar[bool] = True

    images: ImageBatch = Socket("IMAGE")

    def run(self, ctx: RunContext) -> Output:
        # the result carries the pictures as PreviewImage's do, so a workflow ending here still gives its picture
        return save_images(ctx, self.images.pixels, f"ComfyUI_temp_{ctx.prompt_id[:5]}", "temp", ctx.temp_dir)


def resize_pixels(pixels: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize IMAGE [B, H, W, C]; 0 for one side keeps the aspect ratio; `center` crops to the new aspect."""
    _, old_h, old_w, _ = pixels.shape
    if width == 0 and height == 0:
        return pixels
    width = width or max(1, round(old_w * height / old_h))
    height = height or max(1, round(old_h * width / old_w))
    if crop == "center":
        pixels = center_crop(pixels, width, height, h_axis=1)
    if method == "lanczos":  # torch has no lanczos: Pillow does it per image
        return torch.cat([pil_to_tensor(img.resize((width, height), Image.Resampling.LANCZOS))
                          for img in tensor_to_pils(pixels)])
    kwargs = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    resized = F.interpolate(pixels.movedim(-1, 1), size=(height, width), mode=method, **kwargs)
    return resized.clamp(0, 1).movedim(1, -1)


@register
class ImageScale(Node):
    """Resize images to a width and height."""

    CATEGORY: ClassVar[str] = "image/upscaling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: ImageBatch = Socket("IMAGE")
    upscale_method: str = Choice(UPSCALE_METHODS)
    width: int = Field(512, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    height: int = Field(512, ge=0, le=MAX_RESOLUTION, json_schema_extra={"step": 1})
    crop: str = Choice(("disabled", "center"))

    @classmethod
    def check_values(cls, values: dict[str, Any], limits: Limits) -> list[tuple[str, str]]:
        return size_problems(values["width"], values["height"], 1, limits)

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        return (ImageBatch(resize_pixels(self.image.pixels, self.width, self.height, self.upscale_method, self.crop)),)


@register
class ImageScaleBy(Node):
    """Resize images by a factor (the pixel half of a "hires fix"; LatentUpscaleBy is the latent one)."""

    CATEGORY: ClassVar[str] = "image/upscaling"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ("IMAGE",)

    image: ImageBatch = Socket("IMAGE")
    upscale_method: str = Choice(UPSCALE_METHODS)
    scale_by: float = Field(1.0, ge=0.01, le=8.0, json_schema_extra={"step": 0.01})

    def run(self, ctx: RunContext) -> tuple[ImageBatch]:
        pixels = self.image.pixels
        # each side rounded, as ComfyUI's ImageScaleBy; engine/cost/ holds the result to the limits before the run
        height, width = pixels.shape[1:3]
        new_w, new_h = round(width * self.scale_by), round(height * self.scale_by)
        if new_w < 1 or new_h < 1:
            raise LimitExceeded(f"scaling the {width}x{height} image by {self.scale_by} gives {new_w}x{new_h}; "
                                "use a larger scale_by")
        problems = size_problems(new_w, new_h, 1, ctx.limits)
        if problems:
            raise LimitExceeded(f"scaling the {width}x{height} image by {self.scale_by} gives {new_w}x{new_h}: "
                                f"{problems[0][1]}")
        return (ImageBatch(resize_pixels(pixels, new_w, new_h, self.upscale_method, "disabled")),)
