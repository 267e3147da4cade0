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
from engine.cost.shapes import Cond, GuiderConds, Pictures, Shape, SigmaCount, Step, Upscaler
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
    # one still frame; its MASK is the alpha at that size (an opaque image's is 64x64: never larger but for a
    # frame under 64 pixels a side, which max_side and max_pixels take anyway)
    return (None, None) if size is None else (Pictures("IMAGE", 1, *size), Pictures("MASK", 1, *size))


@_rule("VAEEncode")  # VAEEncodeTiled: engine/cost/tiled_rules.py
def _encode(step: Step, files: Files) -> tuple[Shape, ...]:
    image = step.pictures("pixels")  # cropped to a multiple of 8, as ComfyUI's vae_encode_crop_pixels
    return (image and Pictures("LATENT", image.batch, image.width // 8 * 8, image.height // 8 * 8),)


@_rule("VAEEncodeForInpaint")
def _encode_for_inpaint(step: Step, files: Files) -> tuple[Shape, ...]:
    return _encode(step, files)  # the same crop to the 8-pixel grid; the noise mask rides on the latent


@_rule("InpaintModelConditioning", "InstructPixToPixConditioning")
def _inpaint_conditioning(step: Step, files: Files) -> tuple[Shape, ...]:
    # the conds gain the masked image and mask (used by inpainting UNets only), or the picture to edit (used by
    # InstructPix2Pix and inpainting UNets); the latent is the encoded image's size (InstructPix2Pix: empty)
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
    padded = image and Pictures("IMAGE", image.batch, image.width + step.const("left") + step.const("right"),
                                image.height + step.const("top") + step.const("bottom"))
    return (padded, padded and Pictures("MASK", 1, padded.width, padded.height))  # one mask for the batch


@_rule("MaskToImage")
def _mask_to_image(step: Step, files: Files) -> tuple[Shape, ...]:
    mask = step.pictures("mask")  # one image per mask, at the mask's size (masks: engine/cost/mask_rules.py)
    return (mask and Pictures("IMAGE", mask.batch, mask.width, mask.height),)


@_rule("VAEDecode")  # VAEDecodeTiled: engine/cost/tiled_rules.py
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
    _sampler_context(step)
    return (step.pictures("latent_image"),)


def _guided_lengths(step: Step) -> frozenset[int]:
    """The item lengths of the conds a sampler's model calls take: cfg 1 skips the negative pass, and with it the
    negative's lengths."""
    positive, negative = step.cond("positive"), step.cond("negative")
    lengths = set(positive.lengths if positive else ())
    if negative is not None and not math.isclose(step.const("cfg"), 1.0):
        lengths |= negative.lengths
    return frozenset(lengths)


def _sampler_context(step: Step, lengths: frozenset[int] | None = None, input_name: str = "positive") -> None:
    """A sampler's text context: its conds' item lengths (`_guided_lengths` unless given) repeated to their least
    common multiple, as ComfyUI does (our guided_eps too), held to the limit."""
    lengths = _guided_lengths(step) if lengths is None else lengths
    step.context = math.lcm(*lengths) if lengths else 0
    if step.context > step.limits.max_conditioning_tokens:
        shown = ", ".join(f"{n:,}" for n in sorted(lengths)[:8]) + (", …" if len(lengths) > 8 else "")
        step.refuse("max_conditioning_tokens", step.context,
                    f"repeats its conditionings' items of {shown} tokens to their least common multiple, "
                    f"{step.context:,}, as ComfyUI does", "give the prompts equal numbers of 75-token chunks, or "
                    "shorten them", input_name)


def _sigma_count(step: Step, name: str = "sigmas") -> SigmaCount | None:
    value = step.inputs.get(name)
    return value if isinstance(value, SigmaCount) else None


@_rule("BasicScheduler")
def _basic_scheduler(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.custom_sampling import basic_sigmas
    steps = step.const("steps")
    try:
        sigmas = basic_sigmas(step.const("scheduler"), steps, step.const("denoise"), samplers.DEFAULT_SAMPLING)
    except ValueError:  # validation refused this schedule already; count what was asked
        return (SigmaCount(int(steps) + 1),)
    return (SigmaCount(len(sigmas)),)


@_rule("KarrasScheduler", "ExponentialScheduler", "PolyexponentialScheduler")
def _sigma_schedule(step: Step, files: Files) -> tuple[Shape, ...]:
    return (SigmaCount(int(step.const("steps")) + 1),)


@_rule("SDTurboScheduler")
def _sd_turbo(step: Step, files: Files) -> tuple[Shape, ...]:
    available = max(int(10 * step.const("denoise")), 0)  # the timesteps left after 10 - int(10 * denoise)
    return (SigmaCount(min(int(step.const("steps")), available) + 1),)


@_rule("SplitSigmas")
def _split_sigmas(step: Step, files: Files) -> tuple[Shape, ...]:
    sigmas, at = _sigma_count(step), int(step.const("step"))
    if sigmas is None:
        return (None, None)
    high, low = SigmaCount(min(at + 1, sigmas.length)), SigmaCount(max(sigmas.length - at, 0))
    return (high, low)


@_rule("FlipSigmas")
def _flip_sigmas(step: Step, files: Files) -> tuple[Shape, ...]:
    return (_sigma_count(step),)


@_rule("BasicGuider")
def _basic_guider(step: Step, files: Files) -> tuple[Shape, ...]:
    positive = step.cond("conditioning")
    return (GuiderConds(positive.lengths if positive else frozenset()),)


@_rule("CFGGuider")
def _cfg_guider(step: Step, files: Files) -> tuple[Shape, ...]:
    return (GuiderConds(_guided_lengths(step)),)


@_rule("SamplerCustom", "SamplerCustomAdvanced")
def _sampler_custom(step: Step, files: Files) -> tuple[Shape, ...]:
    sigmas = _sigma_count(step)
    step.steps = max(sigmas.length - 1, 0) if sigmas is not None else 0
    if step.steps > step.limits.max_steps:
        step.refuse("max_steps", step.steps, f"samples {step.steps:,} steps (its sigmas' length less one)",
                    "use a shorter schedule", "sigmas")
    if step.cls.__name__ == "SamplerCustomAdvanced":
        guider = step.inputs.get("guider")
        _sampler_context(step, guider.lengths if isinstance(guider, GuiderConds) else frozenset(), "guider")
    else:
        _sampler_context(step)
    latent = step.pictures("latent_image")
    return (latent, latent)


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
