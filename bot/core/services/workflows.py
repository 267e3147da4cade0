"""/workflow: run an uploaded ComfyUI API-format workflow as one job, and 🔁 it with new seeds.

A member at their queue cap is refused first, before any work. A file then goes through
bot/core/requests/workflow_file.py (size, JSON, UI format refused, /prompt wrapper unwrapped, blocked node
types refused, other members' uploads not loadable, outputs renamed under the results folder) and the
engine's validator (ComfyUI's errors and the whole graph's cost, summarised per node), then into the queue as
ONE job through the same bookkeeping as /imagine (`RequestQueue.enqueue`: the row first, all or nothing, the
per-user cap). The job's images are stored, posted and deleted together.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

from bot.core.cards.summary import workflow_summary
from bot.core.errors import RequestInvalid
from bot.core.front_end import Origin, Requester, Ticket
from bot.core.requests.imagine import DISCORD_INT_MAX
from bot.core.requests.workflow_file import (SOURCE, check_size, checkpoints_of, node_lines, parse_workflow,
                                             refuse_blocked, reseed, seeds_of, summarise, upload_refused,
                                             uploads_read, with_outputs)
from bot.core.results.files import prefix_for
from bot.core.services.queue import RequestQueue
from bot.core.services.user_settings import UserDefaults
from bot.core.storage.records import Generation, NewGeneration
from bot.settings import Settings
from engine.errors import WorkflowInvalid
from engine.queue import EngineService

__all__ = ["Workflows", "variation_refused"]


class Workflows:
    """Uploaded workflows into the queue, and the reroll of their results."""

    def __init__(self, engine: EngineService, settings: Settings, queue: RequestQueue,
                 user_defaults: UserDefaults) -> None:
        self.engine, self.settings, self.queue, self.user_defaults = engine, settings, queue, user_defaults

    async def run(self, data: bytes, filename: str, who: Requester, origin: Origin | None = None, *,
                  private: bool | None = None) -> Ticket:
        """Check, validate and queue an uploaded workflow for `who`; RequestInvalid says why not, and then nothing
        was stored, written or queued. `private` None follows `who`'s /settings."""
        filename = filename[:100]
        self.queue.check_room(who, 1)  # a member at their cap costs no parsing or validating
        check_size(filename, len(data), self.settings.limits.max_workflow_bytes)
        workflow = await asyncio.to_thread(parse_workflow, data, filename)
        refuse_blocked(workflow, filename, self.settings.bot.workflow_blocked_nodes)
        for read in await asyncio.to_thread(uploads_read, workflow, self.engine.input_dir,
                                            self.settings.bot.uploads_folder):
            if not await self.queue.store.sent_input(who.user_id, read.name):
                raise upload_refused(read, filename)
        if private is None:
            private = bool((await self.user_defaults.get(who)).get("private"))
        request: dict[str, Any] = {"filename": filename, "bytes": len(data)}  # /queue and /history show the name
        if private:
            request["private"] = True
        params = {"source": SOURCE, "filename": filename,
                  "prefix": prefix_for(self.settings.bot.results_folder, Path(filename).stem)}
        return await self._queue_workflow("workflow", workflow, params, request, who, origin or Origin())

    async def rerun(self, parent: Generation, who: Requester, origin: Origin, *, private: bool = False) -> Ticket:
        """🔁 on a workflow result: the same graph with a new random seed in every sampler (`private`: to DMs)."""
        self.queue.check_room(who, 1)
        fresh, seeds = reseed(parent.workflow, lambda: secrets.randbelow(DISCORD_INT_MAX + 1))
        if not seeds:
            raise RequestInvalid(f"#{parent.id}'s workflow has no KSampler seed to change (none, or each comes from "
                                 "another node), so a reroll would give the same images; change it and run /workflow")
        params = {key: value for key, value in parent.params.items() if key not in ("checkpoints", "seeds")}
        request = {**parent.request, "reroll_of": parent.id, **({"private": True} if private else {})}
        return await self._queue_workflow("reroll", fresh, params, request, who, origin, parent=parent)

    async def _queue_workflow(self, kind: str, workflow: dict[str, Any], params: dict[str, Any],
                              request: dict[str, Any], who: Requester, origin: Origin, *,
                              parent: Generation | None = None) -> Ticket:
        filename = str(params["filename"])
        ready = with_outputs(workflow, f"{params['prefix']}-{secrets.token_hex(4)}")
        try:
            checked = await asyncio.to_thread(self.engine.validate, ready)
        except WorkflowInvalid as err:
            raise RequestInvalid(summarise(err.body, filename)) from err
        checkpoints, seeds = checkpoints_of(ready), seeds_of(ready)
        first_seed = next(iter(seeds.values()), 0)
        new = NewGeneration(kind=kind, front=self.queue.front, requester_id=who.user_id, request=request,
                            params={**params, "checkpoints": checkpoints, "seeds": seeds},
                            model_name=checkpoints[0] if checkpoints else "",
                            images=[(first_seed, ready)],  # the store keeps seeds up to 2**64 - 1
                            # a 🔁 in DMs of a result made in a server stays that server's (its rules apply)
                            guild_id=origin.guild_id or (parent.guild_id if parent else None) or who.guild_id,
                            channel_id=origin.channel_id,
                            parent_id=parent.id if parent else None)
        summary = workflow_summary(filename, checkpoints, seeds)
        if checked.partial_errors:  # ComfyUI runs the outputs that passed; say which did not
            summary += " · ⚠️ skipped, failed validation: " + "; ".join(node_lines(checked.partial_errors))
        try:
            return await self.queue.enqueue(new, who, origin, summary)
        except WorkflowInvalid as err:  # a model file went away between our check and the queue's
            raise RequestInvalid(summarise(err.body, filename)) from err


def variation_refused(parent: Generation) -> RequestInvalid:
    """Why 🔀 does not work on a workflow result."""
    return RequestInvalid(f"#{parent.id} came from /workflow: 🔀 variations start from an /imagine result. "
                          "React 🔁 to run the workflow again with new seeds, or start /imagine from one of its "
                          "images with image:")
