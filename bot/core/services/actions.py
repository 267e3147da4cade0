"""The actions under a result that make a new image: U1-U4 (upscale, "hires fix"), V1-V4 and Vary (subtle/strong),
🔁 reroll, zoom out and pan (outpainting), ✏️ remix. Transport-free: Discord's buttons and the console's `press`
lines (both spell an `Action`, bot/core/actions.py) call `ResultActions.run`.

Each reads the parent's stored params back (bot/core/storage/params.py), changes what the action changes, and
queues the result through `Generations.derive`, the path 🔁 and 🔀 take: whoever pressed owns the new job (their
queue cap counts), a private parent stays private, and the result goes where the parent went. The sizes come from
engine/templates.py's `upscale_plan` and `outpaint_plan`, within [limits] max_side and max_pixels; which upscaler
and which inpainting checkpoint run is the [bot] config's choice (`upscale_model`, `outpaint_model`).
🗑️ and ℹ️ are the front ends' (Generations.delete, Generations.details); ✏️ opens a form first
(`remix_form`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from bot.core.actions import Action
from bot.core.errors import RequestInvalid
from bot.core.front_end import Origin, Requester, Ticket
from bot.core.requests.imagine import check_sampler, parse_request
from bot.core.requests.names import resolve_name
from bot.core.requests.workflow_file import is_workflow
from bot.core.results.files import prefix_for
from bot.core.services.generations import Generations, plain_params, random_seed, stored_params
from bot.core.storage.records import Generation
from bot.settings import Settings
from engine.errors import NoodleError
from engine.models.upscale import read_spec
from engine.nodes.base import SEED_MAX
from engine.templates import WorkflowParams, outpaint_plan, upscale_plan

__all__ = ["REMIX_FIELDS", "RemixForm", "ResultActions"]

REMIX_FIELDS = ("prompt", "negative", "steps", "cfg", "seed")
_VERBS = {"upscale": "upscaling", "variation": "variations", "vary": "vary", "zoom": "zoom out", "pan": "pan",
          "remix": "remix"}


@dataclass(frozen=True)
class RemixForm:
    """The parent's values as text: what a Discord modal's fields (and `press JOB remix`) start from."""

    prompt: str
    negative: str
    steps: str
    cfg: str
    seed: str


class ResultActions:
    """Upscale, vary, reroll, zoom out, pan and remix a result; each queues one new generation for the presser."""

    def __init__(self, generations: Generations, settings: Settings) -> None:
        self.generations, self.settings = generations, settings
        self.models = generations.models

    async def run(self, generation_id: int, action: Action, who: Requester, origin: Origin | None = None) -> Ticket:
        """Do `action` (as a button or a `press` line names it) on result `generation_id` for `who`."""
        if action.name == "upscale":
            return await self.upscale(generation_id, who, action.image, origin)
        if action.name == "variation":  # V1-V4: Midjourney's V is a strong variation of that image
            return await self.vary(generation_id, who, action.image, "strong", origin)
        if action.name == "vary":
            return await self.vary(generation_id, who, action.image, action.arg or "strong", origin)
        if action.name == "reroll":
            return await self.generations.reroll(generation_id, who, origin)
        if action.name == "zoom":
            return await self.zoom(generation_id, who, action.image, _factor(action.arg or "2"), origin)
        if action.name == "pan":
            return await self.pan(generation_id, who, action.image, action.arg or "left", origin)
        raise RequestInvalid(f"{action.name} makes no new image here: remix needs its edits (remix_form, then "
                             "remix), delete and details are Generations.delete and Generations.details")

    # -- upscale -------------------------------------------------------------------------------

    async def upscale(self, generation_id: int, who: Requester, image: int = 1,
                      origin: Origin | None = None) -> Ticket:
        """Enlarge image `image` by [bot] upscale_factor (held to the limits), with an upscale model or in latent
        space, then sample it again at a low denoise with the same prompt, seed and model."""
        parent, params = await self._parent(generation_id, who, "upscale")
        source = await self.generations.source_image(parent, image)
        bot, limits = self.settings.bot, self.models.allowed
        model, scale = await self._upscaler()
        plan = upscale_plan(source.width, source.height, bot.upscale_factor, model_scale=scale,
                            max_side=limits.max_side, max_pixels=limits.max_pixels)
        if plan.width <= source.width and plan.height <= source.height:
            raise RequestInvalid(f"image {image} of #{parent.id} is {source.width}x{source.height}, already at this "
                                 f"server's limits ({limits.max_side} a side, {limits.max_pixels:,} pixels: "
                                 "limits.max_side and limits.max_pixels in config.toml); there is nothing to enlarge")
        denoise = bot.upscale_denoise if model else bot.upscale_latent_denoise
        seeds = parent.image_seeds or [parent.seed]
        new = replace(_plain(params), seed=seeds[min(image, len(seeds)) - 1], init_image=source.name,
                      denoise=denoise, width=plan.width, height=plan.height, upscale_by=plan.factor,
                      upscale_model=model, prescale=plan.prescale)
        _check_sampler(new)
        return await self.generations.derive("upscale", parent, who, new,
                                             {"upscale_of": parent.id, "upscale_of_image": image}, origin,
                                             prepared=(source,))

    async def _upscaler(self) -> tuple[str | None, int | None]:
        """(file, scale) of the upscale model to use, or (None, None) for the latent path."""
        wanted, factor = self.settings.bot.upscale_model.strip(), self.settings.bot.upscale_factor
        if wanted.lower() == "latent":
            return None, None
        engine = self.generations.engine
        names = await asyncio.to_thread(engine.choices, "upscale_models")
        if wanted:
            name = resolve_name("upscale model", wanted, names, "models/upscale_models ([bot] upscale_model)")
            try:
                return name, await asyncio.to_thread(self._scale, name)
            except NoodleError as err:
                raise RequestInvalid(f"[bot] upscale_model {name!r} cannot be used: {err}") from None
        scales: list[tuple[float, int, str]] = []
        for name in names:
            try:
                scale = await asyncio.to_thread(self._scale, name)
            except NoodleError:  # a broken or foreign file is passed over; /models lists it
                continue
            scales.append((abs(scale - factor), -scale, name))  # closest, then the larger (more detail kept)
        if not scales:
            return None, None
        _, scale, name = min(scales)
        return name, -scale

    def _scale(self, name: str) -> int:
        return read_spec(self.generations.engine.model_path("upscale_models", name), name).scale

    # -- vary ----------------------------------------------------------------------------------

    async def vary(self, generation_id: int, who: Requester, image: int = 1, strength: str = "strong",
                   origin: Origin | None = None) -> Ticket:
        """img2img of image `image` at [bot] vary_subtle_denoise or vary_strong_denoise."""
        if strength not in ("subtle", "strong"):
            raise RequestInvalid(f"vary takes subtle or strong, not {strength!r}")
        await self._parent(generation_id, who, "vary")
        bot = self.settings.bot
        denoise = bot.vary_subtle_denoise if strength == "subtle" else bot.vary_strong_denoise
        return await self.generations.variation(generation_id, who, image, origin, denoise=denoise,
                                                strength=strength)

    # -- zoom out and pan ----------------------------------------------------------------------

    async def zoom(self, generation_id: int, who: Requester, image: int = 1, factor: float = 2.0,
                   origin: Origin | None = None) -> Ticket:
        """Zoom out: every side grows so the canvas is `factor` x the image (held to the limits), and the new area
        is painted in."""
        if not 1.0 < factor <= 4.0:
            raise RequestInvalid(f"zoom out takes a factor above 1 and up to 4 (1.5 and 2 are the buttons), "
                                 f"not {factor:g}")
        return await self._outpaint(generation_id, who, image, origin, factor=factor)

    async def pan(self, generation_id: int, who: Requester, image: int = 1, direction: str = "left",
                  origin: Origin | None = None) -> Ticket:
        """Pan: half the image's side is added in `direction` (left, right, up, down) and painted in."""
        if direction not in ("left", "right", "up", "down"):
            raise RequestInvalid(f"pan goes left, right, up or down, not {direction!r}")
        return await self._outpaint(generation_id, who, image, origin, direction=direction)

    async def _outpaint(self, generation_id: int, who: Requester, image: int, origin: Origin | None, *,
                        factor: float | None = None, direction: str | None = None) -> Ticket:
        parent, params = await self._parent(generation_id, who, "zoom" if factor else "pan")
        source = await self.generations.source_image(parent, image)
        limits = self.models.allowed
        plan = outpaint_plan(source.width, source.height, factor=factor, direction=direction,  # type: ignore[arg-type]
                             max_side=limits.max_side, max_pixels=limits.max_pixels)
        new = replace(_plain(params), seed=random_seed(), init_image=source.name, denoise=1.0, width=plan.width,
                      height=plan.height, prescale=plan.prescale, outpaint=plan.pads,
                      inpaint_checkpoint=await self._inpaint_checkpoint(params.checkpoint))
        _check_sampler(new)
        what = {"zoom": f"{factor:g}"} if factor else {"pan": direction}
        return await self.generations.derive("outpaint", parent, who, new,
                                             {"outpaint_of": parent.id, "outpaint_of_image": image, **what}, origin,
                                             prepared=(source,))

    async def _inpaint_checkpoint(self, checkpoint: str) -> str | None:
        """[bot] outpaint_model's choice for a parent made on `checkpoint`: None is masked sampling on it."""
        wanted = self.settings.bot.outpaint_model.strip()
        if wanted.lower() == "none":
            return None
        arch = await self.models.architecture(checkpoint)
        names = (await self.models.context()).checkpoints
        if wanted:
            name = resolve_name("checkpoint", wanted, names, "models/checkpoints ([bot] outpaint_model)")
            chosen = await self.models.architecture(name)
            if not chosen.inpainting or (chosen.family, chosen.tiny) != (arch.family, arch.tiny):
                raise RequestInvalid(f"[bot] outpaint_model {name!r} is {chosen.label}"
                                     f"{' inpainting' if chosen.inpainting else ', not an inpainting model'}; "
                                     f"{checkpoint!r} needs an {arch.label} inpainting checkpoint (one whose UNet "
                                     "takes 9 channels), or set outpaint_model = \"none\" for masked sampling")
            return name
        if arch.inpainting:
            return checkpoint
        for name in sorted(names):
            try:
                candidate = await self.models.architecture(name)
            except NoodleError:  # not loadable: /models says why
                continue
            if candidate.inpainting and (candidate.family, candidate.tiny) == (arch.family, arch.tiny):
                return name
        return None

    # -- remix ---------------------------------------------------------------------------------

    async def remix_form(self, generation_id: int, who: Requester) -> RemixForm:
        """The parent's prompt, negative, steps, cfg and seed as text, for the remix form's defaults."""
        return _form(*await self._parent(generation_id, who, "remix"))

    async def remix(self, generation_id: int, who: Requester, edits: Mapping[str, str],
                    origin: Origin | None = None) -> Ticket:
        """The parent's request with the edited prompt, negative, steps, cfg and seed (blank seed: a new one),
        checked as /imagine checks them; model, size, sampler, LoRAs, init image and ControlNet stay."""
        unknown = sorted(set(edits) - set(REMIX_FIELDS))
        if unknown:
            raise RequestInvalid(f"remix changes {', '.join(REMIX_FIELDS)}; not {', '.join(unknown)}")
        parent, params = await self._parent(generation_id, who, "remix")
        form = _form(parent, params)
        text = {name: str(edits.get(name, getattr(form, name))).strip() for name in REMIX_FIELDS}
        gate = self.generations.queue.gate
        if gate is not None:  # the words as typed, as /imagine reads them (the queue reads the expanded graph)
            await gate.check_typed(parent.guild_id or who.guild_id, who, "remix",
                                   {"prompt": text["prompt"], "negative": text["negative"]})
        allowed = self.models.allowed
        steps = _number("steps", text["steps"] or form.steps, int, 1, allowed.max_steps)
        cfg = _number("cfg", text["cfg"] or form.cfg, float, 0, allowed.max_cfg)
        seed = _number("seed", text["seed"], int, 0, SEED_MAX) if text["seed"] else random_seed()
        options: dict[str, Any] = {
            "prompt": text["prompt"], "negative": text["negative"], "steps": steps, "cfg": cfg, "seed": seed,
            "model": params.checkpoint, "sampler": params.sampler_name, "scheduler": params.scheduler,
            **{key: parent.request[key] for key in ("loras", "style") if parent.request.get(key)},
        }
        context = await self.models.context()
        request = parse_request(options, context)  # the limits, the prompt's length, the LoRA names
        arch = await self.models.architecture(params.checkpoint)
        # the prompt expands as /imagine's does (style, wildcards, <lora:> tags); only the text and numbers change
        fresh = request.to_params(context, checkpoint=params.checkpoint, arch=arch, seed=seed,
                                  image_size=(params.width, params.height))
        new = replace(params, prompt=fresh.prompt, negative=fresh.negative, steps=steps, cfg=cfg, seed=seed,
                      loras=fresh.loras, batch_size=1,
                      filename_prefix=prefix_for(self.settings.bot.results_folder, request.prompt))
        _check_sampler(new)  # the init image is checked by `derive`, as a reroll's is
        return await self.generations.derive("remix", parent, who, new,
                                             {"remix_of": parent.id, "prompt": text["prompt"],
                                              "negative": text["negative"], "steps": steps, "cfg": cfg,
                                              "seed": seed}, origin)

    # -- shared --------------------------------------------------------------------------------

    async def _parent(self, generation_id: int, who: Requester, action: str) -> tuple[Generation, WorkflowParams]:
        """A result `who` may act on, with its params; a /workflow result is refused (its graph is its own)."""
        self.generations.queue.check_room(who, 1)  # a member at their cap costs no reading or decoding
        parent = await self.generations.usable(generation_id, who)
        if is_workflow(parent):
            raise RequestInvalid(f"#{parent.id} came from /workflow: {_VERBS[action]} needs an /imagine result "
                                 "(Noodle's own recipe to change). Press 🔁 to run the workflow again with new "
                                 "seeds, or start /imagine from one of its images with image:")
        return parent, stored_params(parent)


def _form(parent: Generation, params: WorkflowParams) -> RemixForm:
    """The parent's prompt and negative as its member typed them, and its steps, cfg and seed, as text."""
    negative = parent.request.get("negative")
    return RemixForm(prompt=str(parent.request.get("prompt") or params.prompt),
                     negative=str(negative if negative is not None else params.negative),
                     steps=str(params.steps), cfg=f"{params.cfg:g}", seed=str(parent.seed))


def _plain(params: WorkflowParams) -> WorkflowParams:
    """The parent's params as the start of an upscale or outpaint: one image, no inpaint mask, no ControlNet (its
    hint is the parent's size and framing, not the new canvas's)."""
    return replace(plain_params(params), batch_size=1, inpaint=False, controlnet=None, control_image=None,
                   control_strength=1.0, control_canny=False)


def _check_sampler(params: WorkflowParams) -> None:
    check_sampler(params.sampler_name, params.scheduler, params.steps, params.denoise)


def _factor(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RequestInvalid(f"zoom takes a factor (1.5 or 2), not {text!r}") from None


def _number(name: str, text: str, kind: type[int] | type[float], low: float, high: float) -> Any:
    """A remix field's text as a number in low..high; RequestInvalid names the field, the text and the range."""
    word = "a whole number" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        what = "is not " + word if value is None else f"is outside {low:g} to {high:g}"
        raise RequestInvalid(f"{name}: {text[:40]!r} {what}; give {low:g} to {high:g}")
    return value
