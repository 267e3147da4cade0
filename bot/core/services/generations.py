"""/imagine and what people do with its results: submit, 🔁 reroll, 🔀 variation, 🗑️ delete, ℹ️ details,
/history.

A request becomes one workflow per image (bot/core/requests/ -> engine/templates.py), each with its
own seed, queued with the requester as owner through `RequestQueue` (recorded first, all or nothing).
Rerolls and variations read the parent's stored params back as typed, versioned `WorkflowParams`
(bot/core/storage/params.py) and go through the same queueing as /imagine, by `derive`: the one path every
action on a result takes (the upscale, vary, zoom, pan and remix of bot/core/services/actions.py too), so the
presser owns the new job, a private parent stays private and the result goes where the parent went.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.core.cards.details import details_of
from bot.core.cards.summary import summary_of
from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.front_end import Details, Origin, Requester, Ticket
from bot.core.requests.imagine import DISCORD_INT_MAX, GenerationRequest, RequestContext, parse_request
from bot.core.requests.names import resolve_name
from bot.core.requests.uploads import PreparedImage, prepare_image, save_prepared
from bot.core.requests.workflow_file import is_workflow
from bot.core.results.files import prefix_for, read_parameters, remove_files, touch_inputs
from bot.core.results.retention import inputs_of, owned_folder
from bot.core.services.access import may_moderate, not_found, reachable
from bot.core.services.models import ModelChoices
from bot.core.services.queue import RequestQueue
from bot.core.services.server_presets import ServerPresets
from bot.core.services.user_settings import UserDefaults
from bot.core.services.workflows import Workflows, variation_refused
from bot.core.storage.params import StoredParamsInvalid, dump_params, load_params
from bot.core.storage.records import Generation, NewGeneration
from bot.core.storage.store import Store
from bot.settings import Settings
from engine.nodes.base import SEED_MAX
from engine.queue import EngineService
from engine.templates import WorkflowParams, build_workflow

__all__ = ["ACTION_KEYS", "Generations", "origin_of", "plain_params", "random_seed", "stored_params"]

# what an action records in a request about its parent: not inherited by what is made from the result
ACTION_KEYS = frozenset({"reroll_of", "variation_of", "variation_of_image", "vary", "upscale_of", "upscale_of_image",
                         "outpaint_of", "outpaint_of_image", "zoom", "pan", "remix_of", "private"})


class Generations:
    """/imagine requests and their results."""

    def __init__(self, engine: EngineService, store: Store, settings: Settings, *, models: ModelChoices,
                 presets: ServerPresets, user_defaults: UserDefaults, queue: RequestQueue,
                 workflows: Workflows) -> None:
        self.engine, self.store, self.settings = engine, store, settings
        self.models, self.presets, self.user_defaults = models, presets, user_defaults
        self.queue, self.workflows = queue, workflows

    # -- new requests --------------------------------------------------------------------------

    async def imagine(self, explicit: dict[str, Any], who: Requester, origin: Origin | None = None, *,
                      layered_for: Requester | None = None) -> Ticket:
        """One /imagine: the options as given, layered over the presets and /settings of `layered_for` (default
        `who`; the console keeps its presets in a server of its own), checked and queued for `who`, all against
        one reading of the models folder."""
        context = await self.models.context()
        layered = await self.presets.layered_options(explicit, layered_for or who, context)
        return await self.submit(parse_request(layered, context), who, origin, context=context)

    async def parse(self, options: dict[str, Any]) -> GenerationRequest:
        """Raw options (Discord's or the console's) -> a checked request; RequestInvalid/ModelNotFound say why not."""
        return parse_request(options, await self.models.context())

    async def submit(self, request: GenerationRequest, who: Requester, origin: Origin | None = None, *,
                     context: RequestContext | None = None) -> Ticket:
        """Queue `request` for `who`, one job per image (seeds seed, seed+1, ...); nothing changes when refused."""
        context = context or await self.models.context()
        origin = origin or Origin()
        gate, guild = self.queue.gate, origin.guild_id or who.guild_id
        checkpoint = self.models.pick_checkpoint(request.model, list(context.checkpoints))
        if gate is not None and not request.model:  # no model asked for: the default, or the first the server allows
            rules = await gate.rules(guild)
            if not rules.checkpoint_allowed(checkpoint):
                checkpoint = next((name for name in sorted(context.checkpoints) if rules.checkpoint_allowed(name)),
                                  checkpoint)  # none allowed at all: the queue's check says so
        arch = await self.models.architecture(checkpoint)
        controlnet_arch = None
        if request.controlnet:  # the name resolves (the request checked it); its family from the header
            controlnet_arch = await self.models.controlnet_arch(
                resolve_name("ControlNet", request.controlnet, context.controlnets, "models/controlnet"))
        if gate is not None:  # the words as typed: an inline {cat|nude} is refused whichever the seed picks
            await gate.check_member(guild, who)
            await gate.check_typed(guild, who, "imagine", {"prompt": request.prompt,
                                                           **({"negative": request.negative} if request.negative
                                                              else {})})
        prepared = control = None
        scores: dict[str, float] = {}
        if request.image is not None:
            prepared = await asyncio.to_thread(prepare_image, request.image.data, request.image.filename,
                                               self.settings.bot.uploads_folder, context.allowed)
        if request.control_image is not None:
            control = await asyncio.to_thread(prepare_image, request.control_image.data,
                                              request.control_image.filename, self.settings.bot.uploads_folder,
                                              context.allowed, "control_image")
        for option, upload in (("image", request.image), ("control_image", request.control_image)):
            if upload is not None and gate is not None:  # every upload is scored; blocked where results would be
                score = await gate.check_upload(guild, origin.channel_id, origin.nsfw, who, "imagine", upload.data,
                                                option, parent_id=origin.parent_id)
                if score is not None:
                    scores[option] = round(score, 4)
        seed = request.seed if request.seed is not None else random_seed(request.batch)
        if seed + request.batch - 1 > SEED_MAX:
            raise RequestInvalid(f"seed {seed} leaves no room for {request.batch} images (one seed each, up to "
                                 f"{SEED_MAX}); use a smaller seed")
        params = request.to_params(
            context, checkpoint=checkpoint, arch=arch, seed=seed, init_image=prepared.name if prepared else None,
            image_size=(prepared.width, prepared.height) if prepared else None,
            inpaint=prepared is not None and prepared.transparent, control_image=control.name if control else None,
            controlnet_arch=controlnet_arch, filename_prefix=prefix_for(self.settings.bot.results_folder,
                                                                        request.prompt))
        recorded = request.stored()
        for option, score in scores.items():
            recorded[option]["nsfw_score"] = score
        return await self._queue("imagine", params, request.batch, recorded, who, origin,
                                 prepared=tuple(image for image in (prepared, control) if image is not None))

    async def reroll(self, generation_id: int, who: Requester, origin: Origin | None = None) -> Ticket:
        """The same graphs with new seeds: the engine's cache serves everything above the sampler."""
        parent = await self.usable(generation_id, who)
        if is_workflow(parent):
            private = await self._keeps_private(parent, who)
            return await self.workflows.rerun(parent, who, origin or origin_of(parent), private=private)
        count = max(1, len(parent.jobs))
        params = replace(stored_params(parent), seed=random_seed(count))
        return await self.derive("reroll", parent, who, params, {"reroll_of": parent.id}, origin, count=count)

    async def variation(self, generation_id: int, who: Requester, image: int = 1, origin: Origin | None = None, *,
                        denoise: float | None = None, strength: str | None = None) -> Ticket:
        """img2img of image `image` (1-based) of a result at `denoise` (default: the configured variation
        denoise); `strength` (subtle, strong) is recorded for the card when the denoise came from Vary."""
        parent = await self.usable(generation_id, who)
        if is_workflow(parent):
            raise variation_refused(parent)
        prepared = await self.source_image(parent, image)
        # the ControlNet stays (its image too); a result's PNG is opaque, so an inpaint's variation is img2img
        params = replace(plain_params(stored_params(parent)), seed=random_seed(1), init_image=prepared.name,
                         denoise=denoise if denoise is not None else self.settings.bot.variation_denoise,
                         batch_size=1, inpaint=prepared.transparent, width=prepared.width // 8 * 8,
                         height=prepared.height // 8 * 8)
        request: dict[str, Any] = {"variation_of": parent.id, "variation_of_image": image}
        if strength:
            request["vary"] = strength
        return await self.derive("variation", parent, who, params, request, origin, prepared=(prepared,))

    # -- the one path every action on a result takes (🔁, 🔀, and bot/core/services/actions.py) --------------

    async def source_image(self, parent: Generation, image: int) -> PreparedImage:
        """Image `image` (1-based) of `parent`'s PNGs, checked and named as an upload (saved when queued)."""
        if parent.safety == "block":  # held back by the server's rules: nothing is made from its pixels
            raise RequestInvalid(f"#{parent.id} was held back by this server's rules (NSFW score "
                                 f"{parent.nsfw_score or 0:.2f}), so nothing can be made from its images; use "
                                 "/imagine with another prompt")
        if not 1 <= image <= len(parent.images):
            raise RequestInvalid(f"#{parent.id} has {len(parent.images)} image(s); pick 1 to {len(parent.images)}")
        data = await asyncio.to_thread(_read_bytes, parent.images[image - 1])
        if data is None:
            raise RequestInvalid(f"image {image} of #{parent.id} is no longer on disk; reroll it or run /imagine")
        # our own PNG, not an attachment: held to what LoadImage takes, not to Discord's upload size (an upscaled
        # 2048x2048 PNG passes 10 MiB)
        allowed = replace(self.models.allowed, max_attachment_bytes=self.settings.limits.max_input_image_bytes)
        return await asyncio.to_thread(prepare_image, data, f"#{parent.id} image {image}",
                                       self.settings.bot.uploads_folder, allowed)

    async def derive(self, kind: str, parent: Generation, who: Requester, params: WorkflowParams,
                     request: dict[str, Any], origin: Origin | None = None, *, count: int = 1,
                     prepared: tuple[PreparedImage, ...] = ()) -> Ticket:
        """Queue `params` as a new generation of `kind` made from `parent`, owned by `who` (their queue cap counts),
        private when the parent was or `who` keeps results private, posted where the parent was unless `origin`
        says otherwise; `request` is what the action adds to the parent's recorded options."""
        self._check_sources(params, parent, prepared)
        inherited = {key: value for key, value in parent.request.items() if key not in ACTION_KEYS}
        recorded = {**inherited, **request}
        if await self._keeps_private(parent, who):
            recorded["private"] = True
        return await self._queue(kind, params, count, recorded, who, origin or origin_of(parent),
                                 prepared=prepared, parent=parent)

    def _check_sources(self, params: WorkflowParams, parent: Generation,
                       prepared: tuple[PreparedImage, ...]) -> None:
        """The parent's input files the new graph loads are still there (the ones this action prepares are saved
        when it is queued)."""
        input_dir, fresh = self.engine.input_dir, {image.name for image in prepared}
        if params.init_image and params.init_image not in fresh and not (input_dir / params.init_image).is_file():
            raise RequestInvalid(f"the image #{parent.id} started from is gone from the input folder; "
                                 "attach it again with /imagine image:")
        if params.control_image and not (input_dir / params.control_image).is_file():
            raise RequestInvalid(f"the control image of #{parent.id} is gone from the input folder; attach it "
                                 "again with /imagine control_image:")

    async def _queue(self, kind: str, params: WorkflowParams, count: int, request: dict[str, Any], who: Requester,
                     origin: Origin, *, prepared: tuple[PreparedImage, ...] = (),
                     parent: Generation | None = None) -> Ticket:
        self.queue.check_room(who, count)
        # the server it belongs to, whose rules apply: where it is posted, else its parent's (a 🔁 in DMs on a
        # private result made in a server stays that server's), else the member's
        guild = origin.guild_id or (parent.guild_id if parent else None) or who.guild_id
        if self.queue.gate is not None:  # shown on the card and in the PNG as what the sampler was given
            params = replace(params, negative=await self.queue.gate.with_enforced(guild, params.negative))
        # A name of its own per image: SaveImage is cached like any node (as in ComfyUI), so the same graph
        # twice would hand back the first run's files, which a 🗑️ on that first result then removes.
        images = [(params.seed + n, build_workflow(replace(
            params, seed=params.seed + n, batch_size=1,
            filename_prefix=f"{params.filename_prefix}-{secrets.token_hex(4)}"))) for n in range(count)]
        input_dir = self.engine.input_dir
        created: list[str] = []  # the files this call wrote, removed again if the queueing is refused
        try:
            for image in prepared:
                if await asyncio.to_thread(save_prepared, image, input_dir, self.settings.limits.min_free_disk_mb):
                    created.append(str(input_dir / image.name))
        except BaseException:
            await asyncio.to_thread(remove_files, created)
            raise
        # the parent's sources a 🔁 or an action loads again are in use from now: touched, so retention (which takes
        # uploads by their age) leaves them to this request
        reused = {params.init_image, params.control_image} - {None, *(image.name for image in prepared)}
        await asyncio.to_thread(touch_inputs, input_dir, sorted(str(name) for name in reused))
        new = NewGeneration(kind=kind, front=self.queue.front, requester_id=who.user_id, request=request,
                            params=dump_params(replace(params, batch_size=1)), model_name=params.checkpoint,
                            images=images, guild_id=guild, channel_id=origin.channel_id,
                            parent_id=parent.id if parent else None)
        try:
            return await self.queue.enqueue(new, who, origin, summary_of(params, count))
        except BaseException:
            await asyncio.to_thread(remove_files, created)
            raise

    # -- results -------------------------------------------------------------------------------

    async def delete(self, generation_id: int, who: Requester) -> Generation:
        """Remove a result's files and retire it (the requester, or a Manage Messages member of its server)."""
        generation = await self.usable(generation_id, who)
        if not may_moderate(generation, who):
            raise NotAllowed(f"only the requester of #{generation.id} or members with Manage Messages can delete it; "
                             "react with 🔁 or 🔀 to make your own version instead")
        await asyncio.to_thread(remove_files, generation.images)
        await self.store.mark_deleted(generation.id, time.time())
        await self._remove_source(generation)
        return generation

    async def _remove_source(self, generation: Generation) -> None:
        """The upload a deleted result started from goes too, unless another result loads the same file (uploads
        are named by their content, so two members' identical attachments are one file)."""
        input_dir = self.engine.input_dir
        uploads = owned_folder(input_dir, self.settings.bot.uploads_folder, "uploads_folder")
        for name in sorted(inputs_of(generation)):
            # only an upload: never an owner's own input file that a /workflow loaded
            if uploads is not None and uploads in (input_dir / name).resolve().parents \
                    and not await self.store.uses_input(name, besides=generation.id):
                await asyncio.to_thread(remove_files, [str(input_dir / name)])

    async def details(self, generation_id: int, who: Requester) -> Details:
        """Everything that reproduces a result: its card, A1111's parameters text, the workflow JSON."""
        generation = await self.usable(generation_id, who)
        parameters = await asyncio.to_thread(read_parameters, generation.images)
        return details_of(generation, parameters)

    async def history(self, who: Requester, limit: int = 10) -> list[Generation]:
        """`who`'s latest generations, newest first (/history)."""
        return await self.store.recent(who.user_id, limit)

    async def get(self, generation_id: int) -> Generation | None:
        """A generation by its number (the `#12` in a result's footer)."""
        return await self.store.get(generation_id)

    async def by_message(self, message_id: int | str) -> Generation | None:
        """The generation posted as message `message_id`, across restarts."""
        return await self.store.by_message(message_id)

    async def by_job(self, job_id: str) -> Generation | None:
        """The generation one of whose images is job `job_id`."""
        return await self.store.by_job(job_id)

    async def usable(self, generation_id: int, who: Requester) -> Generation:
        """A finished result `who` may reach; another server's, a DM one or someone's private one reads as missing."""
        generation = await reachable(self.store, generation_id, who)
        if generation is None:
            raise not_found(generation_id, "generation", "results show their number in the footer")
        if generation.state == "deleted":
            raise RequestInvalid(f"#{generation.id} was deleted; run /imagine again")
        if generation.state != "done":
            raise RequestInvalid(f"#{generation.id} is {generation.state}; wait for its result")
        return generation

    async def _keeps_private(self, parent: Generation, who: Requester) -> bool:
        """Anything made from a result (reroll, variation, upscale, outpaint, remix) is private when its parent was (it
        stays in DMs) or when the member who acted keeps /settings private: True (their version goes to their DMs)."""
        return parent.private or bool((await self.user_defaults.get(who)).get("private"))


def plain_params(params: WorkflowParams) -> WorkflowParams:
    """`params` without an upscale's or outpaint's parts: what an img2img of its result starts from."""
    return replace(params, upscale_by=1.0, upscale_model=None, prescale=None, outpaint=None,
                   inpaint_checkpoint=None)


def random_seed(count: int = 1) -> int:
    """A random seed for `count` images (seed, seed+1, ...) that people can type back into Discord (integer
    options stop at 2**53), leaving room for the batch."""
    return secrets.randbelow(DISCORD_INT_MAX - count + 2)


def stored_params(generation: Generation) -> WorkflowParams:
    """A result's params read back (any stored version); RequestInvalid when they no longer fit."""
    try:
        return load_params(generation.params)
    except StoredParamsInvalid as err:
        raise RequestInvalid(f"#{generation.id} was stored in a form this Noodle cannot rebuild ({err}); run "
                             "/imagine again with its prompt") from None


def origin_of(generation: Generation) -> Origin:
    """Where a result was posted: what an action on it defaults to."""
    return Origin(channel_id=generation.channel_id, guild_id=generation.guild_id)


def _read_bytes(path: str) -> bytes | None:
    file = Path(path)
    return file.read_bytes() if file.is_file() else None
