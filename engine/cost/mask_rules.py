"""Cost rules of the MASK nodes (engine/nodes/masks.py): a mask is followed as Pictures of kind "MASK", so what
MaskToImage makes of it is held to the same limits as any image.

Without them a MASK had no shape, so SolidMask -> MaskToImage -> ImageBatch doublings passed validation with 64
images where max_batch is 8, or 1,024 images of 2048x2048 (48 GiB of pixels) that the nodes then tried to make.

Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports both.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import Pictures, Shape, Step


def mask_of(image: Pictures | None) -> Pictures | None:
    """The mask a node makes at an image's (or latent's) size, one per item."""
    return image and Pictures("MASK", image.batch, image.width, image.height)


@_rule("SolidMask")
def _solid_mask(step: Step, files: Files) -> tuple[Shape, ...]:
    return (Pictures("MASK", 1, step.const("width"), step.const("height")),)


@_rule("LoadImageMask")
def _load_image_mask(step: Step, files: Files) -> tuple[Shape, ...]:
    size = files.image_size(step.const("image"))  # one channel of the still frame (64x64 when it has none)
    return (None if size is None else Pictures("MASK", 1, *size),)


@_rule("ImageToMask")
def _image_to_mask(step: Step, files: Files) -> tuple[Shape, ...]:
    return (mask_of(step.pictures("image")),)


@_rule("GrowMask", "InvertMask")
def _same_mask(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("mask"),)


@_rule("MaskComposite")
def _mask_composite(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("destination"),)  # the source is cut to the destination
