"""`Studio`: what a front end can ask of Noodle (submit, reroll, vary, delete, explain, follow a job).

It knows nothing of Discord or terminals. A request becomes one workflow per image (bot/request.py,
the engine's templates), each with its own seed, queued with the requester as owner (so the queue's
limits apply to whoever asked, reactions included; the queue samples compatible jobs as one batch),
and recorded in SQLite first. One background task follows every job the engine reports: it stores
each ended job, settles a request once all its images ended and hands it to the front end's
`Publisher`, so results of jobs resumed after a restart are posted too (bot/settle.py).
An uploaded /workflow is one job of its own graph, queued the same way (bot/workflow_desk.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.access import may_moderate, not_found, reachable
from bot.errors import GenerationNotFound, NotAllowed, RequestInvalid
from bot.files import PreparedImage, prepare_image, read_parameters, remove_files, save_prepared
from bot.follow import merged_events
from bot.options import name_suggestions, resolve_name
from bot.outcome import details_of, prefix_for, summary_of
from bot.preset_desk import PresetDesk
from bot.queue_desk import QueueDesk
from bot.records import Generation, NewGeneration
from bot.request import DISCORD_INT_MAX, Allowed, GenerationRequest, RequestContext, parse_request
from bot.retention import Retention, inputs_of, owned_folder
from bot.settings import Settings
from bot.settle import Settler
from bot.store import Store
from bot.tickets import Details, Origin, Publisher, Requester, StudioEvent, Ticket
from bot.token_check import token_text
from bot.workflow_desk import WorkflowDesk, variation_refused
from bot.workflow_file import is_workflow
from engine.errors import NoodleError
from engine.models.detect import Arch, detect_checkpoint
from engine.models.paths import file_fingerprint, short_hash
from engine.nodes.base import SEED_MAX
from engine.queue import EngineService, Owner
from engine.templates import LoraChoice, WorkflowParams, build_workflow

__all__ = ["Studio"]


class Studio(PresetDesk, QueueDesk, WorkflowDesk, Settler):
    """The transport-free service core both front ends call."""

    def __init__(self, engine: EngineService, store: Store, settings: Settings, *, front: str,
                 publisher: Publisher | None = None) -> None:
        super().__init__(engine, store, front=front, publisher=publisher,
                         publish_timeout=settings.bot.publish_timeout_seconds,
                         retention=Retention(store, engine.executor.settings, settings.bot, settings.retention))
        self.settings = settings
        self.allowed = Allowed.from_settings(settings)
        self._arch: dict[tuple[str, str], Arch] = {}

    # -- what can be asked for ---------------------------------------------------------------

    def checkpoints(self, matching: str = "") -> list[str]:
        """Checkpoint files whose names contain `matching` (for autocomplete)."""
        return name_suggestions(matching, self.engine.executor.models.choices("checkpoints"))

    async def context(self) -> RequestContext:
        """The limits and the models folder as they are now (listed off the event loop)."""
        models = self.engine.executor.models
        checkpoints, loras, vaes = await asyncio.to_thread(
            lambda: (models.choices("checkpoints"), models.choices("loras"), models.choices("vae")))
        return RequestContext(self.allowed, checkpoints, loras, vaes)

    async def parse(self, options: dict[str, Any]) -> GenerationRequest:
        """Raw options (Discord's or the console's) -> a checked request; RequestInvalid/ModelNotFound say why not."""
        return parse_request(options, await self.context())

    async def models_text(self) -> str:
        """/models: checkpoints (architecture, size, short hash), LoRAs and embeddings of the models folder."""
        models = self.engine.executor.models
        lines = ["Checkpoints:"]
        for name in await asyncio.to_thread(models.choices, "checkpoints"):
            path = models.resolve("checkpoints", name)
            try:
                arch = (await self._arch_of(name)).name
            except NoodleError as err:  # listed anyway, with why /imagine cannot use it
                arch = f"not loadable: {err}"
            size, digest = await asyncio.to_thread(lambda p=path: (p.stat().st_size, short_hash(p)))
            lines.append(f"  {name} · {arch} · {size / 1e6:,.1f} MB · {digest}")
        for title, folder in (("LoRAs", "loras"), ("Embeddings", "embeddings")):
            names = await asyncio.to_thread(models.choices, folder)
            lines.append(f"{title}: {', '.join(names) or f'none (put .safetensors files in models/{folder})'}")
        if len(lines) == 1 + 2:
            lines.insert(1, "  none: put SD1.5 or SDXL .safetensors files in models/checkpoints")
        return "\n".join(lines)

    async def history(self, who: Requester, limit: int = 10) -> list[Generation]:
        """`who`'s latest generations, newest first (/history)."""
        return await self.store.recent(who.user_id, limit)

    async def tokens(self, text: str) -> str:
        """The token report of `text` (/tokens), with this models folder's embeddings."""
        return await asyncio.to_thread(token_text, text, self.settings.models.dir / "embeddings",
                                       self.settings.limits.max_prompt_chunks)

    # -- new jobs ----------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest, who: Requester, origin: Origin | None = None) -> Ticket:
        """Queue `request` for `who`, one job per image (seeds seed, seed+1, ...); nothing changes when refused."""
        context = await self.context()
        checkpoint = self._checkpoint(request.model, context.checkpoints)
        arch = await self._arch_of(checkpoint)
        prepared = None
        if request.image is not None:
            prepared = await asyncio.to_thread(prepare_image, request.image.data, request.image.filename,
                                               self.settings.bot.uploads_folder, self.allowed)
        seed = request.seed if request.seed is not None else _random_seed(request.batch)
        if seed + request.batch - 1 > SEED_MAX:
            raise RequestInvalid(f"seed {seed} leaves no room for {request.batch} images (one seed each, up to "
                                 f"{SEED_MAX}); use a smaller seed")
        params = request.to_params(
            checkpoint=checkpoint, arch=arch, seed=seed, defaults=self.settings.bot, allowed=self.allowed,
            available_loras=context.loras, available_vaes=context.vaes, init_image=prepared.name if prepared else None,
            image_size=(prepared.width, prepared.height) if prepared else None,
            filename_prefix=prefix_for(self.settings.bot.results_folder, request.prompt))
        return await self._queue("imagine", params, request.batch, request.stored(), who, origin or Origin(),
                                 prepared=prepared)

    async def reroll(self, generation_id: int, who: Requester, origin: Origin | None = None) -> Ticket:
        """The same graphs with new seeds: the engine's cache serves everything above the sampler."""
        parent = await self._usable(generation_id, who)
        private = await self._keeps_private(parent, who)
        if is_workflow(parent):
            return await self.rerun_workflow(parent, who, origin or _origin_of(parent), private=private)
        count = max(1, len(parent.jobs))
        params = replace(_params_of(parent), seed=_random_seed(count))
        if params.init_image and not (self.engine.executor.settings.input_dir / params.init_image).is_file():
            raise RequestInvalid(f"the image #{parent.id} started from is gone from the input folder; "
                                 "attach it again with /imagine image:")
        request = {**parent.request, "reroll_of": parent.id, **({"private": True} if private else {})}
        return await self._queue("reroll", params, count, request, who, origin or _origin_of(parent), parent=parent)

    async def variation(self, generation_id: int, who: Requester, image: int = 1,
                        origin: Origin | None = None) -> Ticket:
        """img2img of image `image` (1-based) of a result at the configured variation denoise."""
        parent = await self._usable(generation_id, who)
        if is_workflow(parent):
            raise variation_refused(parent)
        if not 1 <= image <= len(parent.images):
            raise RequestInvalid(f"#{parent.id} has {len(parent.images)} image(s); pick 1 to {len(parent.images)}")
        data = await asyncio.to_thread(_read_bytes, parent.images[image - 1])
        if data is None:
            raise RequestInvalid(f"image {image} of #{parent.id} is no longer on disk; reroll it or run /imagine")
        prepared = await asyncio.to_thread(prepare_image, data, f"#{parent.id} image {image}",
                                           self.settings.bot.uploads_folder, self.allowed)
        params = replace(_params_of(parent), seed=_random_seed(1), init_image=prepared.name,
                         denoise=self.settings.bot.variation_denoise, batch_size=1,
                         width=prepared.width // 8 * 8, height=prepared.height // 8 * 8)
        request = {**parent.request, "variation_of": parent.id, "variation_of_image": image}
        if await self._keeps_private(parent, who):
            request["private"] = True
        return await self._queue("variation", params, 1, request, who, origin or _origin_of(parent),
                                 prepared=prepared, parent=parent)

    async def _queue(self, kind: str, params: WorkflowParams, count: int, request: dict[str, Any], who: Requester,
                     origin: Origin, *, prepared: PreparedImage | None = None,
                     parent: Generation | None = None) -> Ticket:
        owner = Owner(who.user_id, who.guild_id)
        self._check_room(owner, count)
        # A name of its own per image: SaveImage is cached like any node (as in ComfyUI), so the same graph
        # twice would hand back the first run's files, which a 🗑️ on that first result then removes.
        images = [(params.seed + n, build_workflow(replace(
            params, seed=params.seed + n, batch_size=1,
            filename_prefix=f"{params.filename_prefix}-{secrets.token_hex(4)}"))) for n in range(count)]
        input_dir = self.engine.executor.settings.input_dir
        created = await asyncio.to_thread(save_prepared, prepared, input_dir,
                                          self.settings.limits.min_free_disk_mb) if prepared else False
        new = NewGeneration(kind=kind, front=self.front, requester_id=who.user_id, request=request,
                            params=_params_json(replace(params, batch_size=1)), model_name=params.checkpoint,
                            images=images, guild_id=origin.guild_id or who.guild_id, channel_id=origin.channel_id,
                            parent_id=parent.id if parent else None)
        try:
            return await self._enqueue(new, owner, origin, summary_of(params, count))
        except BaseException:
            if created and prepared is not None:
                await asyncio.to_thread(remove_files, [str(input_dir / prepared.name)])
            raise

    async def _enqueue(self, new: NewGeneration, owner: Owner, origin: Origin, summary: str) -> Ticket:
        """Record a request, then queue one job per workflow of `new.images` (/imagine's images, a /workflow's
        one graph): all or nothing, so a refusal leaves no row and no job behind."""
        generation = await self.store.add(new)
        handles: list[Any] = []
        try:
            for idx, (_, workflow) in enumerate(new.images, 1):
                handle = await self.engine.submit(workflow, owner, extra={
                    "generation_id": generation.id, "idx": idx, "front": self.front, "channel_id": origin.channel_id})
                handles.append(handle)
                await self.store.attach_job(generation.id, idx, handle.job_id)
        except BaseException:
            # all or nothing: a refused image takes its siblings back out of the queue
            for handle in handles:
                await self.engine.cancel(handle.job_id)
            await self.store.discard(generation.id)
            raise
        await self.store.mark_queued(generation.id)
        positions = [p for p in (h.position() for h in handles) if p is not None]
        return Ticket(handles[0].job_id, generation.id, min(positions, default=None), new.kind, summary,
                      tuple(h.job_id for h in handles))

    def _check_room(self, owner: Owner, count: int) -> None:
        """A batch needs one queue place per image: say so before queueing half of it."""
        limit = self.settings.queue.per_user_max
        active = len(self.engine.jobs(owner))
        if active + count > limit:
            raise RequestInvalid(f"this needs {count} place(s) in the queue and you have {active} of {limit} in use "
                                 "([queue] per_user_max); wait for a result or ask for fewer images")

    # -- results -----------------------------------------------------------------------------

    async def delete(self, generation_id: int, who: Requester) -> Generation:
        """Remove a result's files and retire it (the requester, or a Manage Messages member of its server)."""
        generation = await self._usable(generation_id, who)
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
        input_dir = self.engine.executor.settings.input_dir
        uploads = owned_folder(input_dir, self.settings.bot.uploads_folder, "uploads_folder")
        for name in sorted(inputs_of(generation)):
            # only an upload: never an owner's own input file that a /workflow loaded
            if uploads is not None and uploads in (input_dir / name).resolve().parents \
                    and not await self.store.uses_input(name, besides=generation.id):
                await asyncio.to_thread(remove_files, [str(input_dir / name)])

    async def details(self, generation_id: int, who: Requester) -> Details:
        """Everything that reproduces a result: its card, A1111's parameters text, the workflow JSON."""
        generation = await self._usable(generation_id, who)
        parameters = await asyncio.to_thread(read_parameters, generation.images)
        return details_of(generation, parameters)

    async def generation(self, generation_id: int) -> Generation | None:
        """A generation by its number (the `#12` in a result's footer)."""
        return await self.store.get(generation_id)

    async def by_message(self, message_id: int | str) -> Generation | None:
        """The generation posted as message `message_id`, across restarts."""
        return await self.store.by_message(message_id)

    async def by_job(self, job_id: str) -> Generation | None:
        """The generation one of whose images is job `job_id`."""
        return await self.store.by_job(job_id)

    async def _usable(self, generation_id: int, who: Requester) -> Generation:
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
        """A reroll or variation is private when its parent was (it stays in DMs) or when the member who reacted
        keeps /settings private: True (their version of a public result goes to their DMs)."""
        return parent.private or bool((await self.user_settings(who)).get("private"))

    # -- following jobs ----------------------------------------------------------------------

    async def follow(self, job_id: str) -> AsyncIterator[StudioEvent]:
        """A request's position, start and progress (over all its images), then `done` (stored, posted) or `failed`."""
        generation = await self.store.by_job(job_id)
        if generation is None:
            raise GenerationNotFound(f"Noodle has no record of job {job_id}")
        self._followers[generation.id] = self._followers.get(generation.id, 0) + 1
        try:
            async for event in merged_events(self.engine, generation.job_ids or [job_id]):
                yield event
            settled, problem = await self.wait_settled(generation.id)
            kind = "done" if settled.state == "done" else "failed"
            yield StudioEvent(kind, job_id, images=len(settled.jobs), images_done=len(settled.images),
                              generation=settled, error=problem or (settled.error if kind == "failed" else None))
        finally:
            self._followers[generation.id] -= 1
            if not self._followers[generation.id]:
                del self._followers[generation.id]

    # -- helpers -----------------------------------------------------------------------------

    def _checkpoint(self, wanted: str | None, available: list[str]) -> str:
        if not available:
            raise RequestInvalid("models/checkpoints holds no .safetensors file: drop an SD1.5 or SDXL checkpoint "
                                 "there (or run `noodle tiny-models` to try the tiny test models)")
        if wanted:
            return resolve_name("checkpoint", wanted, available, "models/checkpoints")
        configured = self.settings.bot.default_model
        if configured:
            return resolve_name("checkpoint", configured, available, "models/checkpoints ([bot] default_model)")
        return sorted(available)[0]

    async def _arch_of(self, checkpoint: str) -> Arch:
        models = self.engine.executor.models
        path = models.resolve("checkpoints", checkpoint)
        key = (checkpoint, await asyncio.to_thread(file_fingerprint, path))
        if key not in self._arch:  # reads the safetensors header only, never the weights
            self._arch[key] = await asyncio.to_thread(
                detect_checkpoint, path, allow_weights_only_pickle=models.catalog.allow_weights_only_pickle)
        return self._arch[key]


def _random_seed(count: int) -> int:
    """A seed people can type back into Discord (integer options stop at 2**53), leaving room for a batch."""
    return secrets.randbelow(DISCORD_INT_MAX - count + 2)


def _params_json(params: WorkflowParams) -> dict[str, Any]:
    data = dict(params.__dict__)
    data["loras"] = [lora.__dict__ for lora in params.loras]
    return data


def _params_of(generation: Generation) -> WorkflowParams:
    data = dict(generation.params)
    data.pop("extra", None)  # rows stored before WorkflowParams lost its never-used `extra` field carry `{}`
    data["loras"] = tuple(LoraChoice(**lora) for lora in data.get("loras", []))
    return WorkflowParams(**data)


def _origin_of(generation: Generation) -> Origin:
    return Origin(channel_id=generation.channel_id, guild_id=generation.guild_id)


def _read_bytes(path: str) -> bytes | None:
    file = Path(path)
    return file.read_bytes() if file.is_file() else None
