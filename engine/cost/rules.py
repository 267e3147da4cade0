"""How each node makes its outputs' shapes, as its run() does: one rule per class_type, in `RULES`.

A rule reads its node's constants and linked inputs' shapes from a `Step` (engine/cost/shapes.py), and the files
it needs through `Files` (engine/cost/files.py); it returns one shape per output, and sets a sampler's steps and
text context or a saver's images on the step. engine/cost/check.py holds each shape to the limits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from engine import samplers
from engine.cost.files import Files
from engine.cost.shapes import Cond, Pictures, Shape, Step, Upscaler
from engine.errors import NoodleError
from prompts.chunks import CHUNK_TOKENS

__all__ = ["RULES", "Rule"]

ENCODED_CHUNK = CHUNK_TOKENS + 2  # a 75-token chunk is encoded with its start and end tokens: 77 vectors
SAMPLERS = ("KSampler", "KSamplerAdvanced")

Rule = Callable[[Step, Files], tuple[Shape, ...]]
RULES: dict[str, Rule] = {}  # class_type -> how it makes its outputs' shapes; a test holds it to the catalog


def _rule(*class_types: str) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        RULES.update(dict.fromkeys(class_types, rule))
        return rule
    return register


@_rule("EmptyLatentImage")
def _empty_latent(step: Step, files: Files) -> tuple[Shape, ...]:
    # sides floored to a multiple of 8, as the node makes them
    return (Pictures("LATENT", step.const("batch_size"), step.const("width") // 8 * 8,
                     step.const("height") // 8 * 8),)


@_rule("LoadImage")
def _load_image(step: Step, files: Files) -> tuple[Shape, ...]:
    size = files.image_size(step.const("image"))
    return (None if size is None else Pictures("IMAGE", 1, *size), None)  # one still frame; the MASK follows it


@_rule("VAEEncode")
def _encode(step: Step, files: Files) -> tuple[Shape, ...]:
    image = step.pictures("pixels")  # cropped to a multiple of 8, as ComfyUI's vae_encode_crop_pixels
    return (image and Pictures("LATENT", image.batch, image.width // 8 * 8, image.height // 8 * 8),)


@_rule("VAEEncodeForInpaint")
def _encode_for_inpaint(step: Step, files: Files) -> tuple[Shape, ...]:
    return _encode(step, files)  # the same crop to the 8-pixel grid; the noise mask rides on the latent


@_rule("InpaintModelConditioning")
def _inpaint_conditioning(step: Step, files: Files) -> tuple[Shape, ...]:
    # the conds gain the masked image and mask (used by inpainting UNets only); the latent is the encoded image
    return (step.cond("positive"), step.cond("negative"), *_encode(step, files))


@_rule("SetLatentNoiseMask")
def _noise_mask(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("samples"),)


@_rule("LatentCompositeMasked", "ImageCompositeMasked")
def _composite_masked(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("destination"),)  # the source is cut to the destination


@_rule("ImagePadForOutpaint")
def _pad_for_outpaint(step: Step, files: Files) -> tuple[Shape, ...]:
    image = step.pictures("image")
    return (image and Pictures("IMAGE", image.batch, image.width + step.const("left") + step.const("right"),
                               image.height + step.const("top") + step.const("bottom")), None)


@_rule("MaskToImage")
def _mask_to_image(step: Step, files: Files) -> tuple[Shape, ...]:
    return (None,)  # a MASK's size is not followed; the node makes one image per mask, at the mask's size


@_rule("VAEDecode")
def _decode(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    return (latent and Pictures("IMAGE", latent.batch, latent.width, latent.height),)


@_rule("LatentUpscale")
def _latent_upscale(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    if latent is None:
        return (None,)
    # in latent cells, as the node computes them: a side of 0 follows the aspect ratio
    width, height = _resized(latent.width // 8, latent.height // 8, step.const("width") // 8,
                             step.const("height") // 8)
    return (Pictures("LATENT", latent.batch, width * 8, height * 8),)


@_rule("LatentUpscaleBy")
def _latent_upscale_by(step: Step, files: Files) -> tuple[Shape, ...]:
    latent, scale = step.pictures("samples"), step.const("scale_by")
    return (latent and Pictures("LATENT", latent.batch, round(latent.width // 8 * scale) * 8,
                                round(latent.height // 8 * scale) * 8),)


@_rule("ImageScale")
def _image_scale(step: Step, files: Files) -> tuple[Shape, ...]:
    image = step.pictures("image")
    return (image and Pictures("IMAGE", image.batch, *_resized(image.width, image.height, step.const("width"),
                                                               step.const("height"))),)


@_rule("ImageScaleBy")
def _image_scale_by(step: Step, files: Files) -> tuple[Shape, ...]:
    image, scale = step.pictures("image"), step.const("scale_by")
    return (image and Pictures("IMAGE", image.batch, round(image.width * scale), round(image.height * scale)),)


@_rule("UpscaleModelLoader")
def _upscale_loader(step: Step, files: Files) -> tuple[Shape, ...]:
    scale = files.upscale_factor(str(step.const("model_name")))
    return (None if scale is None else Upscaler(scale),)


@_rule("ImageUpscaleWithModel")
def _upscale_with_model(step: Step, files: Files) -> tuple[Shape, ...]:
    image, model = step.pictures("image"), step.inputs.get("upscale_model")
    if image is None or not isinstance(model, Upscaler):
        return (None,)
    return (Pictures("IMAGE", image.batch, image.width * model.scale, image.height * model.scale),)


@_rule("RepeatLatentBatch")
def _repeat(step: Step, files: Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    return (latent and Pictures("LATENT", latent.batch * step.const("amount"), latent.width, latent.height),)


@_rule(*SAMPLERS)
def _sampler(step: Step, files: Files) -> tuple[Shape, ...]:
    step.steps = _sampler_steps(step)
    positive, negative = step.cond("positive"), step.cond("negative")
    # ComfyUI repeats items of different lengths to their least common multiple (our guided_eps does too);
    # cfg 1 skips the negative pass, and with it the negative's lengths
    lengths = set(positive.lengths if positive else ())
    if negative is not None and not math.isclose(step.const("cfg"), 1.0):
        lengths |= negative.lengths
    step.context = math.lcm(*lengths) if lengths else 0
    if step.context > step.limits.max_conditioning_tokens:
        shown = ", ".join(f"{n:,}" for n in sorted(lengths)[:8]) + (", …" if len(lengths) > 8 else "")
        step.refuse("max_conditioning_tokens", step.context,
                    f"repeats its conditionings' items of {shown} tokens to their least common multiple, "
                    f"{step.context:,}, as ComfyUI does", "give the prompts equal numbers of 75-token chunks, or "
                    "shorten them", "positive")
    return (step.pictures("latent_image"),)


@_rule("CLIPTextEncode")
def _text_encode(step: Step, files: Files) -> tuple[Shape, ...]:
    return (_one_item(files.text_chunks(str(step.const("text")))),)


@_rule("CLIPTextEncodeSDXL")
def _text_encode_sdxl(step: Step, files: Files) -> tuple[Shape, ...]:
    # the text with fewer chunks is padded with empty ones to the other's count
    chunks = max(files.text_chunks(str(step.const("text_g"))), files.text_chunks(str(step.const("text_l"))))
    return (_one_item(chunks),)


@_rule("ConditioningCombine")
def _combine(step: Step, files: Files) -> tuple[Shape, ...]:
    first, second = step.cond("conditioning_1"), step.cond("conditioning_2")
    if first is None or second is None:
        return (None,)
    return (Cond(first.items + second.items, first.first, first.lengths | second.lengths),)


@_rule("ConditioningConcat")
def _concat(step: Step, files: Files) -> tuple[Shape, ...]:
    to, source = step.cond("conditioning_to"), step.cond("conditioning_from")
    if to is None or source is None:
        return (None,)
    return (Cond(to.items, to.first + source.first, frozenset(n + source.first for n in to.lengths)),)


@_rule("ConditioningAverage")
def _average(step: Step, files: Files) -> tuple[Shape, ...]:
    to, source = step.cond("conditioning_to"), step.cond("conditioning_from")
    if to is None or source is None:
        return (None,)
    return (to,)  # `from` is cut or padded to each cond's length: the same items and lengths as `to`


@_rule("ConditioningZeroOut", "ConditioningSetTimestepRange")
def _same_conds(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.cond("conditioning"),)  # the same conds, zeroed or with a timestep range


@_rule("ControlNetApply")
def _controlnet_apply(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.cond("conditioning"),)  # the same conds with a ControlNet on each


@_rule("ControlNetApplyAdvanced")
def _controlnet_apply_advanced(step: Step, files: Files) -> tuple[Shape, ...]:
    return step.cond("positive"), step.cond("negative")


@_rule("Canny")
def _canny(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.pictures("image"),)  # an edge picture of the same size


@_rule("SaveImage", "PreviewImage")
def _save(step: Step, files: Files) -> tuple[Shape, ...]:
    images = step.pictures("images")
    step.writes = images.batch if images is not None else 0
    return ()


# -- small image and latent nodes (engine/nodes/image_ops.py, latent_ops.py) ----------------------


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
        shape = latent_file_shape(files.models.resolve("input", str(step.const("latent"))))
    except (NoodleError, OSError):
        return (None,)  # LoadLatent says why when it runs, and holds the file to the limits there too
    if shape is None or len(shape) != 4:
        return (None,)
    return (Pictures("LATENT", shape[0], shape[3] * 8, shape[2] * 8),)


@_rule("SaveLatent")
def _save_latent(step: Step, files: Files) -> tuple[Shape, ...]:
    return ()  # one .latent file; `writes` counts images


# -- helpers ---------------------------------------------------------------------------------------


def _one_item(chunks: int) -> Cond:
    return Cond(1, chunks * ENCODED_CHUNK, frozenset({chunks * ENCODED_CHUNK}))


def _resized(old_w: int, old_h: int, width: int, height: int) -> tuple[int, int]:
    """The size a resize to width x height makes, as LatentUpscale and ImageScale compute it (0: keep aspect)."""
    if width == 0 and height == 0:
        return old_w, old_h
    if not old_w or not old_h:  # an empty input (LatentUpscaleBy to 0 cells): that node fails first in the run
        return width, height
    width = width or max(1, round(old_w * height / old_h))
    height = height or max(1, round(old_h * width / old_w))
    return width, height


def _sampler_steps(step: Step) -> int:
    """The steps a sampler node runs: its sigma schedule's length less one (ddim_uniform may make more)."""
    name, scheduler, steps = step.const("sampler_name"), step.const("scheduler"), step.const("steps")
    model = samplers.model_sigmas()
    try:
        if step.cls.__name__ == "KSamplerAdvanced":
            sigmas = samplers.advanced_sigmas(scheduler, steps, step.const("start_at_step"), step.const("end_at_step"),
                                              step.const("return_with_leftover_noise") != "enable", model,
                                              sampler_name=name)
        else:
            sigmas = samplers.ksampler_sigmas(scheduler, steps, step.const("denoise"), model, sampler_name=name)
    except ValueError:  # validation refused this schedule already; count what was asked
        return int(steps)
    return max(0, len(sigmas) - 1)
