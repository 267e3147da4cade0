"""Cost rules of the small image and latent nodes (engine/nodes/image_ops.py, latent_ops.py): sizes followed
through crops, batches, blends and loaded latents, so the whole graph's limits hold for them too.

Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports both.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import Pictures, Shape, Step
from engine.errors import NoodleError


@_rule("EmptyImage")
def _empty_image(step: Step, files: Files) -> tuple[Shape, ...]:
    return (Pictures("IMAGE", step.const("batch_size"), step.const("width"), step.const("height")),)


@_rule("ImageScaleToTotalPixels")
def _scale_to_total(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.image_ops import total_pixels_size

    image = step.pictures("image")
    if image is None or not image.width or not image.height:
        return (None,)
    return (Pictures("IMAGE", image.batch, *total_pixels_size(image.width, image.height, step.const("megapixels"))),)


@_rule("ImageBlur", "ImageSharpen", "ImageInvert")
def _same_image(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("image"),)


@_rule("ImageBlend")
def _image_blend(step: Step, files: Files) -> tuple[Shape, ...]:
    first, second = step.pictures("image1"), step.pictures("image2")
    if first is None or second is None:
        return (first,)
    return (Pictures("IMAGE", max(first.batch, second.batch), first.width, first.height),)  # batches broadcast


@_rule("ImageCrop")
def _image_crop(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.image_ops import crop_box

    image = step.pictures("image")
    if image is None:
        return (None,)
    _, _, width, height = crop_box(image.width, image.height, step.const("x"), step.const("y"), step.const("width"),
                                   step.const("height"))
    return (Pictures("IMAGE", image.batch, width, height),)


@_rule("ImageBatch")
def _image_batch(step: Step, files: Files) -> tuple[Shape, ...]:
    first, second = step.pictures("image1"), step.pictures("image2")
    if first is None or second is None:
        return (None,)
    return (Pictures("IMAGE", first.batch + second.batch, first.width, first.height),)  # image2 takes image1's size


@_rule("LatentComposite")
def _latent_composite(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("samples_to"),)


@_rule("LatentAdd", "LatentSubtract", "LatentBlend")
def _latent_pair(step: Step, files: Files) -> tuple[Shape, ...]:
    first, second = step.pictures("samples1"), step.pictures("samples2")
    if first is None or second is None or step.cls.__name__ != "LatentBlend":
        return (first,)
    return (Pictures("LATENT", max(first.batch, second.batch), first.width, first.height),)  # batches broadcast


@_rule("LatentMultiply", "LatentFlip")
def _same_latent(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("samples"),)


@_rule("LatentRotate")
def _latent_rotate(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    if latent is None or step.const("rotation") not in ("90 degrees", "270 degrees"):
        return (latent,)
    return (Pictures("LATENT", latent.batch, latent.height, latent.width),)


@_rule("LatentFromBatch")
def _latent_from_batch(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    if latent is None:
        return (None,)
    start = max(0, min(latent.batch - 1, step.const("batch_index")))
    return (Pictures("LATENT", min(latent.batch - start, step.const("length")), latent.width, latent.height),)


@_rule("LatentCrop")
def _latent_crop(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.latent_ops import crop_corner

    latent = step.pictures("samples")
    if latent is None:
        return (None,)
    cells_w, cells_h = latent.width // 8, latent.height // 8
    left, top = crop_corner(step.const("x"), step.const("y"), cells_w, cells_h)
    width, height = min(step.const("width") // 8, cells_w - left), min(step.const("height") // 8, cells_h - top)
    return (Pictures("LATENT", latent.batch, width * 8, height * 8),)


@_rule("LoadLatent")
def _load_latent(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.latent_ops import latent_file_shape

    try:
        shape = latent_file_shape(files.models.resolve("input_latents", str(step.const("latent"))))
    except (NoodleError, OSError):
        return (None,)  # LoadLatent says why when it runs, and holds the file to the limits there too
    if shape is None or len(shape) != 4:
        return (None,)
    return (Pictures("LATENT", shape[0], shape[3] * 8, shape[2] * 8),)


@_rule("SaveLatent")
def _save_latent(step: Step, files: Files) -> tuple[Shape, ...]:
    return ()  # one .latent file; `writes` counts images
