"""What a workflow will cost, computed from the graph before it runs, and refused past config.toml's [limits].

Validation (engine/validate.py) checks each node's own inputs: an EmptyLatentImage of batch 8 passes, and so
does a RepeatLatentBatch of 4 after it, though the sampler then gets 32 latents. Here the shapes are followed
through a validated prompt in run order, from its constants, as the nodes will make them: for each LATENT and
IMAGE value its batch and size in pixels, for each CONDITIONING its items and their token lengths; and the
job's sampler steps and the images its output nodes write are summed. Nothing runs: LoadImage's file gives
its size from its header, an upscale model's its scale from its tensor shapes, a CLIPTextEncode's text its
chunk count from the shipped tokenizer (prompts.plan, the count its encode will have).

Each value is held to max_batch, max_side, max_pixels, max_conditioning_items and max_conditioning_tokens at
the node that makes it; a sampler's text context (its items repeated to one length) to max_conditioning_tokens;
the job to max_job_steps and max_job_images at the node that crosses them. A refusal is ComfyUI's error body
(`WorkflowInvalid`, error type `limit_exceeded`) naming each such node, so /workflow shows one line per node.
A value over a limit is not followed further: its node is the one to fix, and what it feeds would repeat it.

`validate_within_limits` is what the executor calls: the node count first, before any node is checked, then
`engine.validate.validate`, then `check_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from engine import samplers
from engine.errors import NoodleError, WorkflowInvalid
from engine.graph import Workflow, upstream
from engine.images_io import ALLOWED_FORMATS
from engine.models.upscale import read_spec
from engine.nodes.base import Node
from engine.settings import Limits
from engine.validate import ValidatedPrompt, validate
from prompts.chunks import CHUNK_TOKENS
from prompts.embeddings import EmbeddingLibrary
from prompts.errors import PromptError
from prompts.plan import token_report

__all__ = ["LIMIT_EXCEEDED", "RULES", "Cond", "ModelFiles", "Pictures", "WorkflowCost", "check_cost",
           "validate_within_limits"]

LIMIT_EXCEEDED = "limit_exceeded"  # our error type, beside ComfyUI's (engine.validate.ERROR_TYPES)
ENCODED_CHUNK = CHUNK_TOKENS + 2  # a 75-token chunk is encoded with its start and end tokens: 77 vectors
SAMPLERS = ("KSampler", "KSamplerAdvanced")
_ORIENTATION = 0x0112  # EXIF orientations 5 to 8 turn the picture a quarter: LoadImage swaps its sides


class ModelFiles(Protocol):
    """What validation and the cost need of the model manager: folder listings, files, embeddings."""

    def choices(self, folder: str) -> list[str]: ...

    def resolve(self, folder: str, name: str) -> Path: ...

    @property
    def embeddings(self) -> EmbeddingLibrary: ...


@dataclass(frozen=True)
class Pictures:
    """The shape of a LATENT or IMAGE value: `batch` items of width x height pixels (a latent's cells x 8)."""

    kind: str  # "LATENT" or "IMAGE"
    batch: int
    width: int
    height: int


@dataclass(frozen=True)
class Cond:
    """The shape of a CONDITIONING value: its items, the first one's tokens, and every item length in it."""

    items: int
    first: int  # ConditioningConcat appends the first item of its `conditioning_from`
    lengths: frozenset[int]


@dataclass(frozen=True)
class Upscaler:
    """The shape of an UPSCALE_MODEL value: how many times it grows each side (read from the file's header)."""

    scale: int


Shape = Pictures | Cond | Upscaler | None  # None: no shape (MODEL, VAE ...), not known, or already over a limit


@dataclass(frozen=True)
class WorkflowCost:
    """What a workflow will ask of the machine, in the measures config.toml limits."""

    nodes: int  # nodes that run
    steps: int  # sampler steps, all samplers together
    images: int  # images SaveImage and PreviewImage write
    batch: int  # the largest latent or image batch
    side: int  # the longest side of any latent (in pixels) or image
    pixels: int  # the largest width x height of any latent or image
    conditioning_items: int  # the most items of one conditioning
    conditioning_tokens: int  # the longest text context: one item, or a sampler's items repeated to one length


@dataclass
class _Step:
    """One node while the shapes are followed: its constants, its linked inputs' shapes, what it adds."""

    cls: type[Node]
    constants: Mapping[str, Any]
    inputs: Mapping[str, Shape]
    limits: Limits
    steps: int = 0  # sampler steps this node runs
    writes: int = 0  # images this node writes
    context: int = 0  # a sampler's text context, in tokens
    errors: list[dict[str, Any]] = field(default_factory=list)

    def const(self, name: str) -> Any:
        """A constant input, or the node's default for it."""
        return self.constants[name] if name in self.constants else self.cls.model_fields[name].default

    def pictures(self, name: str) -> Pictures | None:
        value = self.inputs.get(name)
        return value if isinstance(value, Pictures) else None

    def cond(self, name: str) -> Cond | None:
        value = self.inputs.get(name)
        return value if isinstance(value, Cond) else None

    def refuse(self, limit: str, got: int, what: str, fix: str, input_name: str | None = None, per: str = "") -> None:
        """Add a refusal: `what` the node does, then the limit (`per` side, job ...), then `fix`."""
        allowed = getattr(self.limits, limit)
        self.errors.append({
            "type": LIMIT_EXCEEDED, "message": "Over this server's limits",
            "details": f"{what}; this server's limit is {allowed:,}{per} (limits.{limit} in config.toml): {fix}",
            "extra_info": {"input_name": input_name, "limit": limit, "limit_value": allowed, "received_value": got}})


class _Files:
    """What `check_cost` reads beside the graph, each file and text once: input images' headers, prompts' chunks."""

    def __init__(self, models: ModelFiles, limits: Limits) -> None:
        self.models, self.limits = models, limits
        self.sizes: dict[str, tuple[int, int] | None] = {}
        self.chunks: dict[str, int] = {}
        self.scales: dict[str, int | None] = {}
        self._embeddings: EmbeddingLibrary | None = None

    def image_size(self, name: str) -> tuple[int, int] | None:
        """An input image's size once upright; None when it does not open (LoadImage says why when it runs)."""
        if name not in self.sizes:
            try:
                self.sizes[name] = _header_size(self.models.resolve("input", name), self.limits)
            except NoodleError:
                self.sizes[name] = None
        return self.sizes[name]

    def upscale_factor(self, name: str) -> int | None:
        """An upscale model's scale from its header; None when it does not load (UpscaleModelLoader says why)."""
        if name not in self.scales:
            try:
                self.scales[name] = read_spec(self.models.resolve("upscale_models", name), name).scale
            except NoodleError:
                self.scales[name] = None
        return self.scales[name]

    def text_chunks(self, text: str) -> int:
        """The 75-token chunks a prompt is encoded in, after the max_prompt_chunks cut."""
        if text not in self.chunks:
            if self._embeddings is None:
                self._embeddings = self.models.embeddings
            try:
                count = token_report(text, self._embeddings, max_chunks=self.limits.max_prompt_chunks).chunks
            except PromptError:  # its encode refuses it with this message when the job runs; bound it meanwhile
                count = self.limits.max_prompt_chunks
            self.chunks[text] = count
        return self.chunks[text]


Rule = Callable[[_Step, _Files], tuple[Shape, ...]]
RULES: dict[str, Rule] = {}  # class_type -> how it makes its outputs' shapes; a test holds it to the catalog


def _rule(*class_types: str) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        RULES.update(dict.fromkeys(class_types, rule))
        return rule
    return register


def check_cost(prompt: ValidatedPrompt, limits: Limits, models: ModelFiles,
               registry: Mapping[str, type[Node]]) -> WorkflowCost:
    """The cost of a validated prompt; raises WorkflowInvalid naming each node past a limit."""
    files = _Files(models, limits)
    shapes: dict[str, tuple[Shape, ...]] = {}
    refused: dict[str, list[dict[str, Any]]] = {}
    totals = {"steps": 0, "images": 0}
    context = 0
    for node_id in prompt.order:
        class_type = str(prompt.workflow.nodes[node_id].class_type)
        inputs = {name: shapes[src][index] if index < len(shapes[src]) else None
                  for name, (src, index) in prompt.links.get(node_id, {}).items()}
        step = _Step(registry[class_type], prompt.constants.get(node_id, {}), inputs, limits)
        rule = RULES.get(class_type)
        shapes[node_id] = tuple(_held(step, shape) for shape in (rule(step, files) if rule else ()))
        _add_to_job(step, totals)
        context = max(context, step.context)
        if step.errors:
            refused[node_id] = step.errors
    if refused:
        raise WorkflowInvalid(_body(prompt, refused))
    made = [shape for outputs in shapes.values() for shape in outputs]
    pictures = [s for s in made if isinstance(s, Pictures)]
    conds = [s for s in made if isinstance(s, Cond)]
    return WorkflowCost(
        nodes=len(prompt.order), steps=totals["steps"], images=totals["images"],
        batch=max((p.batch for p in pictures), default=0),
        side=max((max(p.width, p.height) for p in pictures), default=0),
        pixels=max((p.width * p.height for p in pictures), default=0),
        conditioning_items=max((c.items for c in conds), default=0),
        conditioning_tokens=max([context, *(max(c.lengths) for c in conds)]))


def validate_within_limits(workflow: object, registry: Mapping[str, type[Node]], models: ModelFiles,
                           limits: Limits) -> ValidatedPrompt:
    """Validate as ComfyUI does, bounded: the node count before any node is checked, the whole cost after."""
    parsed = Workflow.parse(workflow)
    if len(parsed.nodes) > limits.max_workflow_nodes:
        message = (f"the workflow has {len(parsed.nodes):,} nodes; this server's limit is "
                   f"{limits.max_workflow_nodes:,} (limits.max_workflow_nodes in config.toml): a graph for one "
                   "picture has tens, so split it into several workflows")
        raise WorkflowInvalid({"error": {"type": LIMIT_EXCEEDED, "message": message, "details": "",
                                         "extra_info": {"limit": "max_workflow_nodes"}}, "node_errors": {}})
    prompt = validate(parsed, registry, models.choices, limits)
    check_cost(prompt, limits, models, registry)
    return prompt


# -- how each node makes its outputs' shapes, as its run() does -----------------------------------


@_rule("EmptyLatentImage")
def _empty_latent(step: _Step, files: _Files) -> tuple[Shape, ...]:
    # sides floored to a multiple of 8, as the node makes them
    return (Pictures("LATENT", step.const("batch_size"), step.const("width") // 8 * 8,
                     step.const("height") // 8 * 8),)


@_rule("LoadImage")
def _load_image(step: _Step, files: _Files) -> tuple[Shape, ...]:
    size = files.image_size(step.const("image"))
    return (None if size is None else Pictures("IMAGE", 1, *size), None)  # one still frame; the MASK follows it


@_rule("VAEEncode")
def _encode(step: _Step, files: _Files) -> tuple[Shape, ...]:
    image = step.pictures("pixels")  # cropped to a multiple of 8, as ComfyUI's vae_encode_crop_pixels
    return (image and Pictures("LATENT", image.batch, image.width // 8 * 8, image.height // 8 * 8),)


@_rule("VAEEncodeForInpaint")
def _encode_for_inpaint(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return _encode(step, files)  # the same crop to the 8-pixel grid; the noise mask rides on the latent


@_rule("InpaintModelConditioning")
def _inpaint_conditioning(step: _Step, files: _Files) -> tuple[Shape, ...]:
    # the conds gain the masked image and mask (used by inpainting UNets only); the latent is the encoded image
    return (step.cond("positive"), step.cond("negative"), *_encode(step, files))


@_rule("SetLatentNoiseMask")
def _noise_mask(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (step.pictures("samples"),)


@_rule("LatentCompositeMasked", "ImageCompositeMasked")
def _composite_masked(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (step.pictures("destination"),)  # the source is cut to the destination


@_rule("ImagePadForOutpaint")
def _pad_for_outpaint(step: _Step, files: _Files) -> tuple[Shape, ...]:
    image = step.pictures("image")
    return (image and Pictures("IMAGE", image.batch, image.width + step.const("left") + step.const("right"),
                               image.height + step.const("top") + step.const("bottom")), None)


@_rule("MaskToImage")
def _mask_to_image(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (None,)  # a MASK's size is not followed; the node makes one image per mask, at the mask's size


@_rule("VAEDecode")
def _decode(step: _Step, files: _Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    return (latent and Pictures("IMAGE", latent.batch, latent.width, latent.height),)


@_rule("LatentUpscale")
def _latent_upscale(step: _Step, files: _Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    if latent is None:
        return (None,)
    # in latent cells, as the node computes them: a side of 0 follows the aspect ratio
    width, height = _resized(latent.width // 8, latent.height // 8, step.const("width") // 8,
                             step.const("height") // 8)
    return (Pictures("LATENT", latent.batch, width * 8, height * 8),)


@_rule("LatentUpscaleBy")
def _latent_upscale_by(step: _Step, files: _Files) -> tuple[Shape, ...]:
    latent, scale = step.pictures("samples"), step.const("scale_by")
    return (latent and Pictures("LATENT", latent.batch, round(latent.width // 8 * scale) * 8,
                                round(latent.height // 8 * scale) * 8),)


@_rule("ImageScale")
def _image_scale(step: _Step, files: _Files) -> tuple[Shape, ...]:
    image = step.pictures("image")
    return (image and Pictures("IMAGE", image.batch, *_resized(image.width, image.height, step.const("width"),
                                                               step.const("height"))),)


@_rule("ImageScaleBy")
def _image_scale_by(step: _Step, files: _Files) -> tuple[Shape, ...]:
    image, scale = step.pictures("image"), step.const("scale_by")
    return (image and Pictures("IMAGE", image.batch, round(image.width * scale), round(image.height * scale)),)


@_rule("UpscaleModelLoader")
def _upscale_loader(step: _Step, files: _Files) -> tuple[Shape, ...]:
    scale = files.upscale_factor(str(step.const("model_name")))
    return (None if scale is None else Upscaler(scale),)


@_rule("ImageUpscaleWithModel")
def _upscale_with_model(step: _Step, files: _Files) -> tuple[Shape, ...]:
    image, model = step.pictures("image"), step.inputs.get("upscale_model")
    if image is None or not isinstance(model, Upscaler):
        return (None,)
    return (Pictures("IMAGE", image.batch, image.width * model.scale, image.height * model.scale),)


@_rule("RepeatLatentBatch")
def _repeat(step: _Step, files: _Files) -> tuple[Shape, ...]:
    latent = step.pictures("samples")
    return (latent and Pictures("LATENT", latent.batch * step.const("amount"), latent.width, latent.height),)


@_rule(*SAMPLERS)
def _sampler(step: _Step, files: _Files) -> tuple[Shape, ...]:
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
def _text_encode(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (_one_item(files.text_chunks(str(step.const("text")))),)


@_rule("CLIPTextEncodeSDXL")
def _text_encode_sdxl(step: _Step, files: _Files) -> tuple[Shape, ...]:
    # the text with fewer chunks is padded with empty ones to the other's count
    chunks = max(files.text_chunks(str(step.const("text_g"))), files.text_chunks(str(step.const("text_l"))))
    return (_one_item(chunks),)


@_rule("ConditioningCombine")
def _combine(step: _Step, files: _Files) -> tuple[Shape, ...]:
    first, second = step.cond("conditioning_1"), step.cond("conditioning_2")
    if first is None or second is None:
        return (None,)
    return (Cond(first.items + second.items, first.first, first.lengths | second.lengths),)


@_rule("ConditioningConcat")
def _concat(step: _Step, files: _Files) -> tuple[Shape, ...]:
    to, source = step.cond("conditioning_to"), step.cond("conditioning_from")
    if to is None or source is None:
        return (None,)
    return (Cond(to.items, to.first + source.first, frozenset(n + source.first for n in to.lengths)),)


@_rule("ControlNetApply")
def _controlnet_apply(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (step.cond("conditioning"),)  # the same conds with a ControlNet on each


@_rule("ControlNetApplyAdvanced")
def _controlnet_apply_advanced(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return step.cond("positive"), step.cond("negative")


@_rule("Canny")
def _canny(step: _Step, files: _Files) -> tuple[Shape, ...]:
    return (step.pictures("image"),)  # an edge picture of the same size


@_rule("SaveImage", "PreviewImage")
def _save(step: _Step, files: _Files) -> tuple[Shape, ...]:
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


def _sampler_steps(step: _Step) -> int:
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


def _held(step: _Step, shape: Shape) -> Shape:
    """`shape`, or None once it is over a limit (the refusal added to the node's)."""
    before, limits = len(step.errors), step.limits
    if isinstance(shape, Pictures):
        noun, size = ("latents" if shape.kind == "LATENT" else "images"), f"{shape.width:,}x{shape.height:,}"
        if shape.batch > limits.max_batch:
            step.refuse("max_batch", shape.batch, f"makes a batch of {shape.batch:,} {noun}", "make fewer at once")
        if max(shape.width, shape.height) > limits.max_side:
            step.refuse("max_side", max(shape.width, shape.height), f"makes {noun} of {size} pixels",
                        "choose a smaller size (a side given as 0 follows the input's aspect ratio)", per=" a side")
        elif shape.width * shape.height > limits.max_pixels:
            step.refuse("max_pixels", shape.width * shape.height,
                        f"makes {noun} of {size} = {shape.width * shape.height:,} pixels", "choose a smaller size")
    elif isinstance(shape, Cond):
        if shape.items > limits.max_conditioning_items:
            step.refuse("max_conditioning_items", shape.items,
                        f"makes a conditioning of {shape.items:,} items (ConditioningCombine adds its inputs' items, "
                        "and each is one more UNet pass per latent per step)", "combine fewer")
        if max(shape.lengths) > limits.max_conditioning_tokens:
            step.refuse("max_conditioning_tokens", max(shape.lengths),
                        f"makes a conditioning of {max(shape.lengths):,} tokens (ConditioningConcat adds its inputs' "
                        "lengths)", "concatenate fewer or shorter prompts")
    return shape if len(step.errors) == before else None


def _add_to_job(step: _Step, totals: dict[str, int]) -> None:
    """Add a node's steps and images to the job's; the node that first crosses a job limit is named."""
    for key, added, what, fix in (("steps", step.steps, "the job's sampler steps", "use fewer samplers or steps"),
                                  ("images", step.writes, "the images the job writes",
                                   "save fewer images, or smaller batches")):
        limit = f"max_job_{key}"
        before, totals[key] = totals[key], totals[key] + added
        if before <= getattr(step.limits, limit) < totals[key]:
            step.refuse(limit, totals[key], f"brings {what} to {totals[key]:,} ({added:,} here)", fix, key, " a job")


def _header_size(path: Path, limits: Limits) -> tuple[int, int] | None:
    """An image file's size once upright, from its header and EXIF; None if it is not an image LoadImage takes."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as opened:
            width, height = opened.size
            if width * height > limits.max_pixels:
                return width, height  # refused by its size whichever way up: no need to look further
            # a PNG may keep its EXIF after the pixels, which Pillow then decodes to reach (at most max_pixels)
            return (height, width) if opened.getexif().get(_ORIENTATION) in (5, 6, 7, 8) else (width, height)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None


def _body(prompt: ValidatedPrompt, refused: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """ComfyUI's error body: each refused node with the outputs that need it."""
    reach = {out: upstream(prompt.workflow, [out]) for out in prompt.outputs}
    node_errors = {node_id: {"errors": errors, "dependent_outputs": [out for out in prompt.outputs
                                                                     if node_id in reach[out]],
                             "class_type": str(prompt.workflow.nodes[node_id].class_type)}
                   for node_id, errors in refused.items()}
    return {"error": {"type": LIMIT_EXCEEDED, "message": "Workflow is over this server's limits", "details": "",
                      "extra_info": {}}, "node_errors": node_errors}

