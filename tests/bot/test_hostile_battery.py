"""Every hostile input of issue 12, replayed through the real Studio on a real SQLite file and the tiny models.

One table row per input (the issue's list, in its order): the action performs the input and returns the words
the member is shown. For each, the battery checks the message's key words, that no row is left in `generations`,
`generation_jobs` or `engine_jobs` and no file under the output or input folder (an input that is accepted and
fails at run time leaves exactly its one failed request, no image), and that the next ordinary job runs.
Random console lines and random uploaded workflows are thrown at the same machinery in test_hostile_fuzz.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from PIL import Image

from bot.console.app import Console, ConsolePublisher, LineReader
from bot.core.requests.imagine import ImageUpload
from bot.core.front_end import Origin, Requester
from engine.errors import NoodleError
from engine.nodes.base import SEED_MAX
from tests.bot.conftest import WAIT, Env
from tests.bot.core.services.test_queue import BOB, queued
from tests.bot.core.requests.test_uploads import card_size, imagine_with, load_and_save
from tests.bot.core.services.test_workflows import ALICE, as_file, graph
from tests.bot.core.services.test_workflow_limits import combined, concatenated, repeated, widened
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import GATE_SEED, Gate
from tests.engine.test_cost import chained_samplers
from tests.engine.test_images_io import GREY_16, apng, chunk, encode, exif_rotated_jpeg, grey16_png, \
    png_by_hand

SMALL = "steps: 2 width: 64 height: 64"
HUGE = "9" * 5000
MOD_B = Requester("60", "888", "mod-b", can_manage_messages=True)  # a moderator of another server
TABLES = {"generations": "SELECT id, state FROM generations",
          "generation_jobs": "SELECT generation_id || '/' || idx, state FROM generation_jobs",
          "engine_jobs": "SELECT job_id, state FROM engine_jobs"}


# -- what a refusal must leave as it was ----------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Every row (key, state) of the three job tables and every file under the output and input folders."""

    rows: dict[str, frozenset[tuple[Any, str]]]
    files: frozenset[str]


def trace(env: Env) -> Trace:
    with closing(sqlite3.connect(f"file:{env.settings.bot.database}?mode=ro", uri=True)) as db:
        rows = {table: frozenset(db.execute(query)) for table, query in TABLES.items()}
    folders = (env.settings.engine.output_dir, env.settings.engine.input_dir)
    return Trace(rows, frozenset(str(p) for folder in folders for p in folder.rglob("*") if p.is_file()))


@dataclass
class Battery:
    """What an action works with: the running Noodle, and the state a refusal is compared with."""

    env: Env
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    before: Trace | None = None
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def mark(self) -> None:
        """The state from here on must survive the input (an action calls it again after its own setup)."""
        self.before = trace(self.env)

    def later(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run `cleanup` once the state after the input has been read (a held job, a changed setting)."""
        self.cleanups.append(cleanup)

    @property
    def origin(self) -> Origin:
        return Origin(str(self.env.channel.id), "777")


async def refusal(call: Callable[[], Awaitable[Any]]) -> str:
    """The message of a call that must be refused with a NoodleError."""
    try:
        await call()
    except NoodleError as err:
        return str(err)
    raise AssertionError("the hostile input was accepted")


class ConsoleSession:
    """One `noodle chat` console on the Studio, run line by line so that `last` carries over."""

    def __init__(self, env: Env, details_dir: Path) -> None:
        self.out = io.StringIO()
        env.studio.results.publisher = ConsolePublisher(self.out)
        self.console = Console(env.studio, self.out, io.StringIO(), interactive=False, details_dir=details_dir)

    async def line(self, text: str) -> list[str]:
        start = len(self.out.getvalue())
        await self.console.handle(text)
        return self.out.getvalue()[start:].splitlines()

    async def run(self, lines: list[str]) -> tuple[int, str]:
        """The lines as a session from stdin: its exit code and all it printed."""
        code = await self.console.run(LineReader(io.StringIO("\n".join(lines) + "\n")))
        return code, self.out.getvalue()

    async def refused(self, text: str) -> str:
        """A line that must print one `error:` line and nothing else."""
        [printed] = await self.line(text)
        assert printed.startswith("error: "), printed
        return printed.removeprefix("error: ")


# -- the inputs -----------------------------------------------------------------------------------------------


async def upload(battery: Battery, data: bytes) -> str:
    """/imagine with `data` attached as "in.png" (image/png), whatever it really is."""
    studio = battery.env.studio

    async def call() -> None:
        image = ImageUpload(filename="in.png", content_type="image/png", data=data)
        options = {"prompt": "a wall", "steps": 2, "image": image}
        await studio.generations.submit(await studio.generations.parse(options), ALICE, battery.origin)
    return await refusal(call)


def header_apng() -> bytes:
    """The issue's 200 frames of 1024x1024 as a header alone: decoding it would cost 5 GB."""
    actl = chunk(b"acTL", struct.pack(">II", 200, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1024, 1024, 0, 0, 1, 10, 0, 0))
    return png_by_hand(1024, 1024, 8, 2, None, extra=actl + fctl)


async def workflow(battery: Battery, data: bytes) -> str:
    return await refusal(lambda: battery.env.studio.workflows.run(data, "attack.json", ALICE, battery.origin))


def saving(count: int) -> dict[str, Any]:
    """txt2img with `count` more SaveImage nodes of the same images."""
    graph_ = txt2img()
    graph_.update({f"s{i}": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}
                   for i in range(count)})
    return graph_


def huge_integer() -> bytes:
    return as_file(graph()).decode().replace('"seed": 5', f'"seed": {HUGE}', 1).encode()


async def extreme_weight_in_workflow(battery: Battery) -> str:
    """(fox:1e39) in an uploaded graph's CLIPTextEncode: queued (the text is read when the node runs), then failed."""
    graph_ = txt2img(seed=13)
    graph_["6"]["inputs"]["text"] = "(fox:1e39)"
    final = await battery.env.finish(await battery.env.studio.workflows.run(as_file(graph_), "weights.json", ALICE,
                                                                           battery.origin))
    assert final.kind == "failed" and final.generation.images == []
    return final.error or ""


async def animated_load_image(battery: Battery) -> str:
    """An APNG already in the input folder, read by LoadImage: queued, then failed at run time."""
    name = f"forty-frames-{uuid.uuid4().hex}.png"
    path = battery.env.settings.engine.input_dir / name
    path.write_bytes(apng(40))
    try:
        final = await load_and_save(battery.env, name)
    finally:
        path.unlink()
    assert final.kind == "failed" and final.generation is not None and final.generation.images == []
    return final.error or ""


async def at_queue_cap(battery: Battery) -> str:
    """Alice holds her one place; her next upload is refused before it is parsed or validated."""
    env = battery.env
    gate = Gate(battery.monkeypatch)
    held = await env.studio.workflows.run(as_file(graph(seed=GATE_SEED, negative=f"held {uuid.uuid4().hex}")),
                                         "held.json", ALICE, battery.origin)

    async def release() -> None:
        gate.open()
        assert (await env.finish(held)).kind == "done"
    battery.later(release)
    await gate.wait_entered()
    battery.mark()
    cap_before = env.studio.queue.per_user_max
    env.studio.queue.per_user_max = 1

    async def restore() -> None:
        env.studio.queue.per_user_max = cap_before
    battery.later(restore)
    validated: list[Any] = []
    validate = env.engine.validate
    battery.monkeypatch.setattr(env.engine, "validate", lambda w: validated.append(w) or validate(w))
    text = await workflow(battery, huge_integer())  # would fail to parse: the cap answers first
    assert validated == []
    return text


async def console_line(battery: Battery, line: str) -> str:
    return await ConsoleSession(battery.env, battery.tmp_path).refused(line)


async def variation_of_abc(battery: Battery) -> str:
    session = ConsoleSession(battery.env, battery.tmp_path)
    assert any("wrote " in row for row in await session.line(f"/imagine prompt: a fox seed: 11 {SMALL}"))
    battery.mark()
    return await session.refused("react last 🔀 abc")


async def cancel_from_another_server(battery: Battery) -> str:
    env = battery.env
    gate = Gate(battery.monkeypatch)
    holder = await queued(env, BOB, seed=GATE_SEED, negative=uuid.uuid4().hex)
    await gate.wait_entered()
    alices = await queued(env, ALICE, negative=uuid.uuid4().hex)

    async def release() -> None:
        gate.open()
        for ticket in (holder, alices):
            assert (await env.finish(ticket)).kind == "done"
    battery.later(release)
    battery.mark()
    number = alices.generation_id
    text = await refusal(lambda: env.studio.queue.cancel(MOD_B, number))
    missing = await refusal(lambda: env.studio.queue.cancel(MOD_B, 987_654))
    assert text == missing.replace("#987654", f"#{number}")  # learns nothing a wrong guess would not tell
    assert [e.generation_id for e in await env.studio.queue.entries(ALICE)] == [number]
    return text


async def past_the_time_limit(battery: Battery) -> str:
    env, original = battery.env, battery.env.settings
    env.settings = original.model_copy(
        update={"queue": original.queue.model_copy(update={"job_time_limit_seconds": 0.001})})
    await env.restart()

    async def restore() -> None:
        env.settings = original
        await env.restart()
    battery.later(restore)
    final = await env.run({"prompt": "a fox that takes too long", "negative": uuid.uuid4().hex, "seed": 5})
    assert final.kind == "failed" and not final.generation.images
    return final.error or ""


@dataclass(frozen=True)
class Case:
    """One hostile input: what it does, the words its answer must hold, and whether it is refused outright."""

    name: str
    action: Callable[[Battery], Awaitable[str]]
    fragments: tuple[str, ...]
    outcome: Literal["refused", "failed"] = "refused"


LIMITED = "asks more than this server allows:"
CASES = [
    # uploaded images
    Case("BMP named .png", lambda b: upload(b, encode(Image.new("RGB", (64, 64)), "BMP")),
         ("'in.png' is a BMP file", "Noodle decodes only PNG, JPEG or WebP images")),
    Case("40-frame APNG of 6 KB", lambda b: upload(b, apng(40)),
         ("'in.png' is an animated PNG of 40 frames", "Noodle takes one still image")),
    Case("200-frame 1024x1024 APNG header", lambda b: upload(b, header_apng()),
         ("is an animated PNG of 200 frames", "Noodle takes one still image")),
    # uploaded workflows
    Case("RepeatLatentBatch batch 8 x 4", lambda b: workflow(b, as_file(repeated())),
         (LIMITED, "node 14 (RepeatLatentBatch): makes a batch of 32 latents", "limits.max_batch")),
    Case("LatentUpscale 262144x2048", lambda b: workflow(b, as_file(widened())),
         (LIMITED, "node 14 (LatentUpscale): makes latents of 262,144x2,048 pixels", "limits.max_side")),
    Case("20 chained ConditioningCombine", lambda b: workflow(b, as_file(combined())),
         (LIMITED, "(ConditioningCombine): makes a conditioning of 32 items", "limits.max_conditioning_items")),
    Case("20 chained ConditioningConcat", lambda b: workflow(b, as_file(concatenated())),
         (LIMITED, "(ConditioningConcat): makes a conditioning of 4,928 tokens", "limits.max_conditioning_tokens")),
    Case("900 chained KSamplers at 150 steps", lambda b: workflow(b, json.dumps(chained_samplers(900, 150)).encode()),
         ("the workflow has 907 nodes; this server's limit is 500", "limits.max_workflow_nodes")),
    Case("7 chained KSamplers at 150 steps", lambda b: workflow(b, as_file(chained_samplers(6, 150))),
         (LIMITED, "brings the job's sampler steps to 1,050", "limits.max_job_steps")),
    Case("2,790 SaveImage nodes", lambda b: workflow(b, json.dumps(saving(2789)).encode()),  # with node 9
         ("the workflow has 2,796 nodes; this server's limit is 500", "limits.max_workflow_nodes")),
    Case("41 SaveImage nodes", lambda b: workflow(b, as_file(saving(40))),
         (LIMITED, "brings the images the job writes to 33", "limits.max_job_images")),
    Case("JSON integer of 5,000 digits", lambda b: workflow(b, huge_integer()),
         ("holds an integer of 5,000 digits at line", "no input takes more than 20")),
    Case("animated image in LoadImage", animated_load_image,
         ("is an animated PNG of 40 frames", "Noodle takes one still image"), outcome="failed"),
    Case("member at their queue cap", at_queue_cap, ("needs 1 place(s) in the queue and you have 1 of 1 in use",)),
    # prompts and the console
    Case("__ + 300 letters + __ wildcard", lambda b: console_line(b, f"/imagine prompt: a __{'a' * 300}__ {SMALL}"),
         ("has a 300-character name", "wildcard names are at most 100")),
    Case("seed one past the top", lambda b: console_line(b, f"/imagine prompt: a fox seed: {SEED_MAX + 1} {SMALL}"),
         (f"seed {SEED_MAX + 1} is outside 0..{SEED_MAX}",)),
    Case("react last 🔀 abc", variation_of_abc, ("'abc' is not an image number of #", "pick 1 to 1")),
    Case("(fox:1e39)", lambda b: console_line(b, f"/imagine prompt: (fox:1e39) {SMALL}"),
         ("emphasis weight 1e39 on 'fox' is outside -100 to 100",)),
    Case("(fox:1e39) in a workflow", extreme_weight_in_workflow,
         ("node 6 (CLIPTextEncode) failed", "emphasis weight 1e39 on 'fox' is outside -100 to 100"), outcome="failed"),
    Case("1,000 nested (", lambda b: console_line(b, f"/imagine prompt: {'(' * 1000}fox {SMALL}"),
         ("brackets nest 1000 deep here; at most 64",)),
    Case("/queue cancel: 5,000 digits (found by the fuzz below)", lambda b: console_line(b, f"/queue cancel: {HUGE}"),
         ("/queue takes only cancel: NUMBER, as in /queue cancel: 12",)),
    Case("/queue cancel: ² (a digit int() refuses)", lambda b: console_line(b, "/queue cancel: ²"),
         ("/queue takes only cancel: NUMBER, as in /queue cancel: 12, not 'cancel: ²'",)),
    # permissions, time
    Case("/queue cancel of another server's request", cancel_from_another_server,
         ("there is no request #", "/queue lists yours with their numbers")),
    Case("job past job_time_limit_seconds", past_the_time_limit,
         ("the limit is 0.001 s ([queue] job_time_limit_seconds in config.toml)",), outcome="failed"),
]


async def next_job_runs(env: Env, seed: int) -> None:
    before = trace(env)
    final = await env.run({"prompt": "an ordinary lighthouse at dusk", "seed": seed})
    images = final.generation.images
    assert final.kind == "done" and final.error is None and len(images) == 1 and Path(images[0]).is_file()
    assert trace(env).rows["generations"] - before.rows["generations"] == {(final.generation.id, "done")}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_a_hostile_input_is_answered_leaves_nothing_and_the_next_job_runs(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    battery = Battery(env, tmp_path, monkeypatch)
    battery.mark()
    try:
        text = await asyncio.wait_for(case.action(battery), WAIT)
        after = trace(env)
    finally:
        for cleanup in reversed(battery.cleanups):
            await cleanup()
    missing = [fragment for fragment in case.fragments if fragment not in text]
    assert not missing, f"{text!r} lacks {missing}"
    before = battery.before
    assert before is not None and after.files == before.files  # no upload kept, no PNG written
    for table, rows in after.rows.items():
        left = rows - before.rows[table]
        assert before.rows[table] <= rows, table
        if case.outcome == "refused":
            assert not left, (table, left)
        else:  # its one request is settled as failed, and so are its job rows: nothing stays queued or running
            assert len(left) == 1 and all(state == "failed" for _, state in left), (table, left)
    await next_job_runs(env, zlib.crc32(case.name.encode()))


async def test_what_the_issue_found_broken_but_is_allowed_now_works(env: Env, tmp_path: Path) -> None:
    """16-bit PNGs keep their brightness, EXIF turns images upright, and the largest seed runs."""
    grey = await imagine_with(env, grey16_png(GREY_16, side=64))
    assert grey.kind == "done"
    loaded = await load_and_save(env, grey.generation.workflow["12"]["inputs"]["image"])
    assert set(np.unique(np.asarray(Image.open(loaded.generation.images[0]).convert("RGB")))) <= {116, 117}

    phone = await imagine_with(env, exif_rotated_jpeg(128, 64), "phone.jpg")  # stored 128 wide, shown 64 wide
    assert phone.kind == "done" and card_size(env).startswith("64×128")
    assert Image.open(phone.generation.images[0]).size == (64, 128)
    name = f"portrait-{uuid.uuid4().hex}.jpg"
    path = env.settings.engine.input_dir / name
    path.write_bytes(exif_rotated_jpeg(100, 60))
    try:
        upright = await load_and_save(env, name)
    finally:
        path.unlink()
    assert Image.open(upright.generation.images[0]).size == (60, 100)

    session = ConsoleSession(env, tmp_path)
    printed = await session.line(f"/imagine prompt: a fox seed: {SEED_MAX} {SMALL}")
    assert f"Seed: {SEED_MAX}" in "\n".join(printed) and not [row for row in printed if row.startswith("error:")]
    assert (await env.studio.generations.by_job(session.console.last)).seed == SEED_MAX  # SQLite keeps it whole
