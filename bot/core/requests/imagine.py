"""`GenerationRequest`: the /imagine options, checked against config.toml (`Allowed`) and the models folder
(`RequestContext`), then turned into the engine's `WorkflowParams` (`to_params`); `parse_request` builds one.

Second stop of the flow (command -> request -> workflow). Discord enforces the ranges typed in the
command schema before we see an option; the console does not, and a server owner may change
config.toml between a sync and a command, so every check runs again here and says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from bot.core.errors import RequestInvalid
from bot.core.requests.names import resolve_name
from bot.core.requests.options import parse_loras
from bot.core.requests.prompt import expand_prompt
from bot.settings import BotSettings, Settings
from engine.images_io import IMAGE_SUFFIXES
from engine.models.detect import Arch
from engine.nodes.base import SEED_MAX
from engine.nodes.latents import side_problem, size_problems
from engine.samplers import SCHEDULER_NAMES, SUPPORTED_SAMPLERS, UnfaithfulSampler, check_pair
from engine.templates import LoraChoice, WorkflowParams
from prompts.errors import PromptError
from prompts.plan import Syntax, encoded_fragments

__all__ = ["CONTROL_STRENGTH_MAX", "Allowed", "GenerationRequest", "ImageUpload", "RequestContext", "check_sampler",
           "check_upload_meta", "parse_request"]

SD2_V_SIZE = 768  # SD2.x v-prediction checkpoints (2.0/2.1 768-v) are trained at 768x768
DISCORD_INT_MAX = 2**53 - 1  # Discord's integer options are doubles: larger seeds cannot be typed there
# ComfyUI's ControlNetApplyAdvanced takes 0..10, but past about 2 an SD1.x or SDXL ControlNet's residuals swamp
# the UNet's own features and the picture burns into the hint's lines; published workflows use 0.3-1.5. A slider
# that a member can push to 10 mostly offers broken pictures, so /imagine offers 0..2 (a /workflow keeps 0..10).
CONTROL_STRENGTH_MAX = 2.0
# what engine/images_io.py decodes; anything else is refused before a byte is downloaded
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


@dataclass(frozen=True)
class Allowed:
    """What a request may ask for, from config.toml: the command schema and the checks both read this."""

    max_prompt_chars: int
    max_steps: int
    min_side: int
    max_side: int
    max_pixels: int
    max_batch: int
    max_cfg: float
    max_clip_skip: int
    max_attachment_bytes: int
    samplers: tuple[str, ...] = SUPPORTED_SAMPLERS
    schedulers: tuple[str, ...] = SCHEDULER_NAMES

    @classmethod
    def from_settings(cls, settings: Settings) -> Allowed:
        """The tighter of [limits] (what the engine accepts) and [bot] (what a command offers)."""
        limits, bot = settings.limits, settings.bot
        return cls(
            max_prompt_chars=limits.max_prompt_chars, max_steps=limits.max_steps, min_side=bot.min_side,
            max_side=limits.max_side, max_pixels=limits.max_pixels, max_batch=min(bot.max_batch, limits.max_batch),
            max_cfg=bot.max_cfg, max_clip_skip=bot.max_clip_skip,
            max_attachment_bytes=min(bot.max_attachment_bytes, limits.max_input_image_bytes),
        )


@dataclass(frozen=True)
class RequestContext:
    """What one command is checked and built against, read once per command: the limits, the files of the models
    folder right now, and config.toml's [bot] defaults."""

    allowed: Allowed
    checkpoints: Sequence[str]
    loras: Sequence[str]
    vaes: Sequence[str] = ()
    defaults: BotSettings = field(default_factory=BotSettings)
    controlnets: Sequence[str] = ()
    syntax: Syntax = "noodle"  # [engine] prompt_syntax: how the engine's text encode reads the prompt


def check_upload_meta(filename: str, content_type: str | None, size: int, allowed: Allowed,
                      option: str = "image") -> None:
    """Refuse an attachment (of option `option`) by what Discord says about it, before downloading a byte of it."""
    if content_type is not None and content_type.split(";")[0].strip().lower() not in IMAGE_TYPES:
        raise RequestInvalid(f"{option}: {filename!r} is {content_type}, not an image Noodle decodes; attach a "
                             "PNG, JPEG or WebP file")
    if content_type is None and not filename.lower().endswith(IMAGE_SUFFIXES):
        raise RequestInvalid(f"{option}: {filename!r} does not look like an image; attach a PNG, JPEG or WebP "
                             "file")
    if size > allowed.max_attachment_bytes:
        raise RequestInvalid(f"{option}: {filename!r} is {size / 1e6:.1f} MB; the limit is "
                             f"{allowed.max_attachment_bytes / 1e6:.1f} MB: scale it down or save it as JPEG")


class ImageUpload(BaseModel):
    """An attached image (img2img) as bytes; decoded and measured off the event loop when it is queued
    (bot/core/requests/uploads.py's `prepare_image`)."""

    model_config = ConfigDict(frozen=True)

    filename: str
    content_type: str | None = None
    data: bytes = Field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What is stored about it (never the bytes)."""
        return {"filename": self.filename, "content_type": self.content_type, "bytes": len(self.data)}


class GenerationRequest(BaseModel):
    """The options of one /imagine; None means "the default" (config.toml, or the checkpoint's own size)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative: str | None = None
    model: str | None = None
    loras: str | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    batch: int = 1
    image: ImageUpload | None = None  # img2img; its transparent area, if any, is inpainted
    denoise: float | None = None
    control_image: ImageUpload | None = None  # the ControlNet's hint (a photo, an edge or pose map)
    controlnet: str | None = None  # a file of models/controlnet
    control_strength: float | None = None  # 1.0 when left out, as ComfyUI
    control_canny: bool | None = None  # None: edge-detect when the ControlNet's name says canny (see to_params)
    clip_skip: int | None = None
    vae: str | None = None
    style: str | None = None  # a style of prompts/styles.toml (applied first: bot/core/requests/prompt.py)
    preset: str | None = None  # the server preset these options were layered from (recorded, shown)
    private: bool = False  # the result goes to the requester's DMs instead of the channel (rerolls too)
    notes: tuple[str, ...] = ()  # what the requester should know about how the options were layered (card: Note)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> GenerationRequest:
        context = info.context
        if not isinstance(context, RequestContext):
            raise TypeError("GenerationRequest needs context=RequestContext(...): use parse_request()")
        problems = self._problems(context.allowed)
        if problems:
            raise ValueError("\n".join(problems))
        # names last: a ModelNotFound (not a ValueError) passes through pydantic with its closest names
        if self.model:
            resolve_name("checkpoint", self.model, context.checkpoints, "models/checkpoints")
        for spec in parse_loras(self.loras):
            resolve_name("LoRA", spec.name, context.loras, "models/loras")
        if self.vae:
            resolve_name("VAE", self.vae, context.vaes, "models/vae")
        if self.controlnet:
            resolve_name("ControlNet", self.controlnet, context.controlnets, "models/controlnet")
        return self

    def _problems(self, allowed: Allowed) -> list[str]:
        problems: list[str] = []

        def bound(name: str, value: float | None, low: float, high: float, hint: str) -> None:
            if value is not None and not low <= value <= high:
                problems.append(f"{name} {_num(value)} is outside {_num(low)}..{_num(high)}; {hint}")

        if not self.prompt.strip():
            problems.append("prompt is empty; describe the picture, e.g. prompt: a red fox in the snow")
        for name, text in (("prompt", self.prompt), ("negative", self.negative or "")):
            if len(text) > allowed.max_prompt_chars:
                problems.append(f"{name} is {len(text)} characters; the limit is {allowed.max_prompt_chars} "
                                "(limits.max_prompt_chars in config.toml): shorten it")
        bound("steps", self.steps, 1, allowed.max_steps, "20-30 is typical (limits.max_steps in config.toml)")
        bound("cfg", self.cfg, 0, allowed.max_cfg, "5-8 is typical")
        bound("seed", self.seed, 0, SEED_MAX, "use a whole number from 0, or leave it out for a random one")
        bound("batch", self.batch, 1, allowed.max_batch, f"ask for 1 to {allowed.max_batch} images")
        bound("denoise", self.denoise, 0.01, 1.0, "0.3 keeps the image close, 0.8 changes it a lot")
        bound("clip_skip", self.clip_skip, 1, allowed.max_clip_skip, "1 is off, 2 is what most anime models want")
        problems += [problem for name, side in (("width", self.width), ("height", self.height)) if side is not None
                     and (problem := side_problem(name, side, allowed.max_side, min_side=allowed.min_side, grid=True))]
        if self.sampler is not None and self.sampler not in allowed.samplers:
            problems.append(f"sampler {self.sampler!r} is not available; choose one of {', '.join(allowed.samplers)}")
        if self.scheduler is not None and self.scheduler not in allowed.schedulers:
            problems.append(f"scheduler {self.scheduler!r} is not available; choose one of "
                            f"{', '.join(allowed.schedulers)}")
        if self.image is not None and (self.width is not None or self.height is not None):
            problems.append("width and height set the size of a new image; with an image attached the result keeps "
                            "the image's size: leave them out, or resize the image first")
        if self.image is None and self.denoise is not None:
            problems.append("denoise applies to an attached image (img2img); attach one with image: or leave "
                            "denoise out")
        for option, upload in (("image", self.image), ("control_image", self.control_image)):
            if upload is not None:
                try:
                    check_upload_meta(upload.filename, upload.content_type, len(upload.data), allowed, option)
                except RequestInvalid as err:
                    problems.append(str(err))
        problems += self._control_problems()
        return problems

    def _control_problems(self) -> list[str]:
        """A ControlNet needs both its file and its image; its other options need the ControlNet."""
        problems = []
        if self.control_image is not None and not self.controlnet:
            problems.append("control_image needs a ControlNet to guide with it: pick one with controlnet: (/models "
                            "lists models/controlnet), or attach the image as image: for img2img")
        if self.controlnet and self.control_image is None:
            problems.append(f"controlnet {self.controlnet!r} needs a control image: attach one with control_image: "
                            "(a photo, or an edge, depth or pose map made for that ControlNet)")
        if self.control_strength is not None and not 0 <= self.control_strength <= CONTROL_STRENGTH_MAX:
            problems.append(f"control_strength {_num(self.control_strength)} is outside 0..{CONTROL_STRENGTH_MAX:g}; "
                            "1 is ComfyUI's default, 0.5 guides loosely")
        if not self.controlnet:
            for name in ("control_strength", "control_canny"):
                if getattr(self, name) is not None:
                    problems.append(f"{name} applies to a ControlNet; add controlnet: and control_image:, or "
                                    f"leave {name} out")
        return problems

    def stored(self) -> dict[str, Any]:
        """The options as given, JSON-ready, for the history (an image by its description, not its bytes)."""
        data = self.model_dump(exclude={"image", "control_image"}, exclude_none=True)
        for name, upload in (("image", self.image), ("control_image", self.control_image)):
            if upload is not None:
                data[name] = upload.describe()
        return data

    def to_params(self, context: RequestContext, *, checkpoint: str, arch: Arch, seed: int,
                  init_image: str | None = None, image_size: tuple[int, int] | None = None,
                  inpaint: bool = False, control_image: str | None = None, controlnet_arch: Arch | None = None,
                  filename_prefix: str = "noodle") -> WorkflowParams:
        """The WorkflowParams for this request on `checkpoint` (resolved) of architecture `arch`.

        Defaults: the context's [bot] values; the size by architecture (SDXL 1024, SD1.x 512,
        the tiny test models 64). The prompt expands in bot/core/requests/prompt.py (style, wildcards with
        `seed`, `<lora:..>` tags after `loras`). `inpaint`: the init image has transparent pixels, which are
        inpainted. `control_image` is the saved control image; `controlnet_arch` the ControlNet's family read
        from its header (None: unknown, the engine refuses a mismatch when it runs).
        """
        defaults, allowed = context.defaults, context.allowed
        native = 64 if arch.tiny else defaults.size_sdxl if arch.family == "sdxl" else \
            SD2_V_SIZE if arch.family == "sd2" and arch.prediction == "v_prediction" else defaults.size_sd15
        if image_size is not None:  # VAEEncode crops to a multiple of 8, as ComfyUI does
            width, height = (image_size[0] // 8) * 8, (image_size[1] // 8) * 8
        else:
            width, height = self.width or native, self.height or native
        problems = [problem for _, problem in size_problems(width, height, 1, allowed, min_side=allowed.min_side,
                                                            grid=True)]
        if problems:
            model = checkpoint.removesuffix(".safetensors")
            raise RequestInvalid(f"{model} ({arch.family}, {native}x{native} native) cannot make this size: "
                                 + "; ".join(problems))
        sampler = self.sampler or defaults.default_sampler
        scheduler = self.scheduler or defaults.default_scheduler
        steps = self.steps or defaults.default_steps
        denoise = (self.denoise or defaults.img2img_denoise) if init_image else 1.0
        check_sampler(sampler, scheduler, steps, denoise)
        chosen = tuple(LoraChoice(resolve_name("LoRA", spec.name, context.loras, "models/loras"),
                                  spec.strength_model, spec.strength_clip) for spec in parse_loras(self.loras))
        negative = self.negative if self.negative is not None else defaults.default_negative
        try:
            expanded = expand_prompt(self.prompt, negative, seed=seed, available_loras=context.loras,
                                     style=self.style, loras=chosen)
        except PromptError as err:
            raise RequestInvalid(f"prompt: {err}") from None
        for name, text in (("prompt", expanded.prompt), ("negative", expanded.negative)):
            try:  # the text encode reads the emphasis again; read here, a bad weight never reaches the queue
                encoded_fragments(text, context.syntax)
            except PromptError as err:
                raise RequestInvalid(f"{name}: {err}") from None
        controlnet = resolve_name("ControlNet", self.controlnet, context.controlnets, "models/controlnet") \
            if self.controlnet else None
        if (controlnet is None) != (control_image is None):
            raise TypeError("to_params needs control_image exactly when the request has a controlnet")
        if controlnet and controlnet_arch is not None and controlnet_arch.family != arch.family:
            raise RequestInvalid(f"ControlNet {controlnet!r} is for {_family(controlnet_arch)} checkpoints and "
                                 f"{checkpoint.removesuffix('.safetensors')} is {_family(arch)}; pick a ControlNet "
                                 f"made for {_family(arch)} (/models lists each one's family) or another model")
        # Canny when the member picked a canny ControlNet and did not say: they attach a photo and expect its edges
        # (as most published canny workflows preprocess); a depth, pose or scribble ControlNet takes the map as
        # made, and control_canny: false passes an edge map they made themselves untouched. The card says which.
        canny = self.control_canny if self.control_canny is not None else bool(controlnet and
                                                                              "canny" in controlnet.lower())
        return WorkflowParams(
            checkpoint=checkpoint, prompt=expanded.prompt, negative=expanded.negative, seed=seed, steps=steps,
            cfg=self.cfg if self.cfg is not None else defaults.default_cfg, sampler_name=sampler,
            scheduler=scheduler, width=width, height=height, batch_size=self.batch, loras=expanded.loras,
            clip_skip=-self.clip_skip if self.clip_skip and self.clip_skip > 1 else None, init_image=init_image,
            denoise=denoise, filename_prefix=filename_prefix,
            vae=resolve_name("VAE", self.vae, context.vaes, "models/vae") if self.vae else None,
            inpaint=bool(init_image and inpaint), control_image=control_image, controlnet=controlnet,
            control_strength=self.control_strength if self.control_strength is not None else 1.0,
            control_canny=canny,
        )


def _family(arch: Arch) -> str:
    return "SDXL" if arch.family == "sdxl" else "SD1.x"


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


_PYDANTIC_WORDS = {
    "int_parsing": "is not a whole number", "int_from_float": "is not a whole number",
    "float_parsing": "is not a number", "extra_forbidden": "is not an option of /imagine",
    "missing": "is required", "string_type": "must be text", "bool_parsing": "is not true or false",
}


def check_sampler(sampler: str, scheduler: str, steps: int, denoise: float) -> None:
    """RequestInvalid when `sampler` with `scheduler` cannot run these steps faithfully (engine/samplers)."""
    try:
        check_pair(sampler, scheduler, steps, denoise)
    except UnfaithfulSampler as err:
        raise RequestInvalid(f"sampler {sampler} with scheduler {scheduler}: {err}") from None


def parse_request(options: dict[str, Any], context: RequestContext) -> GenerationRequest:
    """Validate raw options (Discord's typed values or the console's strings); RequestInvalid says why not."""
    try:
        return GenerationRequest.model_validate(options, context=context)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            where = ".".join(str(part) for part in item["loc"])
            if item["type"] == "value_error":
                lines.append(re.sub(r"^Value error, ", "", item["msg"]))
            else:
                words = _PYDANTIC_WORDS.get(item["type"], item["msg"].lower())
                value = f" {item['input']!r}" if item["type"] not in ("missing",) and where != "" else ""
                lines.append(f"{where}{value} {words}".strip())
        raise RequestInvalid("\n".join(lines)) from None
