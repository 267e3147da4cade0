"""`press JOB ACTION` in `noodle chat`: the buttons under a Discord result, typed.

    press last U2                 upscale image 2 (U1-U4)          press JOB V1         vary image 1 strongly
    press last zoom 2             zoom out 2x (or 1.5)             press JOB pan left   (right, up, down)
    press JOB vary strong         (or subtle)                      press JOB reroll
    press JOB delete              press JOB details
    press JOB remix prompt: a blue fox steps: 12     (also negative: cfg: seed:, Discord's `name: value`; seed:
                                                     with nothing after it takes a new random seed)

JOB is a printed job id or `last`, as `react` takes. The action is parsed by bot/core/actions.py's
`parse_action` (the grammar Discord's button ids share) and done by the Studio's `actions` service; the console
follows the new job as it follows `react`'s.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bot.core.actions import parse_action
from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester, Ticket
from bot.core.requests.options import parse_options
from bot.core.services.actions import REMIX_FIELDS

__all__ = ["PRESS_HELP", "press_line"]

PRESS_HELP = """  press JOB U1-U4|V1-V4|reroll|delete|details      the buttons under a result (JOB: a job id or `last`)
  press JOB vary subtle|strong, zoom 1.5|2, pan left|right|up|down
  press JOB remix prompt: a blue fox steps: 12      edit and run again (negative: cfg: seed: too; a bare seed:
                                                    takes a new random one)"""


async def press_line(studio: Any, who: Requester, rest: str, *, last: str | None,
                     details_dir: Path) -> Ticket | str:
    """Run `press JOB ACTION ...` (everything after `press`) for `who`: the new job's ticket to follow, or the
    text to print (delete, details); `last` is the job `last` means."""
    job, _, tail = rest.strip().partition(" ")
    if not job:
        raise RequestInvalid("write press JOB ACTION, e.g. press last U2 (JOB is a printed job id or `last`)")
    job_id = last if job == "last" else job
    generation = await studio.generations.by_job(job_id) if job_id else None
    if generation is None:
        raise RequestInvalid(f"no job {job!r} here; use a job id printed in a result's last line, or `last`")
    head, _, edits_text = tail.strip().partition(" ")
    if head.lower() in ("remix", "✏️", "✏"):
        edits = parse_options(edits_text, REMIX_FIELDS, first="prompt")
        if not edits:
            form = await studio.actions.remix_form(generation.id, who)
            now = "; ".join(f"{name}: {getattr(form, name)}" for name in REMIX_FIELDS)
            raise RequestInvalid(f"remix needs what to change, as in press {job} remix prompt: a blue fox steps: "
                                 f"12 (a bare seed: takes a new random one); now {now}")
        return await studio.actions.remix(generation.id, who, edits)
    action = parse_action(tail.split())
    if action.name == "delete":
        await studio.generations.delete(generation.id, who)
        return f"deleted #{generation.id} (job {generation.job_id}) and its files"
    if action.name == "details":
        details = await studio.generations.details(generation.id, who)
        path = details_dir / details.filename
        await asyncio.to_thread(path.write_text, details.workflow_json, encoding="utf-8")
        return f"{details.text}\nworkflow: {path.resolve()}"
    return await studio.actions.run(generation.id, action, who)
