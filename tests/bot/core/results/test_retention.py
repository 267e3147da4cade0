"""Retention on the real Studio and SQLite file: old uploads, engine job rows and (when on) results go; new ones,
those of requests still queued or running, and anything outside the two folders stay. 🗑️ takes the upload
its result started from, unless another result loads the same content-addressed file."""

from __future__ import annotations

import asyncio
import io
import os
import random
import sqlite3
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from bot.core.errors import RequestInvalid
from bot.core.requests.imagine import ImageUpload
from bot.core.results.retention import DAY, Pruned, Retention, still_expired
from bot.settings import RetentionSettings, Settings
from bot.core.front_end import Origin, Requester
from tests.bot.conftest import WAIT, Env, _origin
from tests.engine.queue.service_support import GATE_SEED, Gate

WHO = Requester("42", "777")
OLD = 40 * DAY  # past the 30-day defaults


def _png() -> bytes:
    # a colour of its own: uploads are named by content, and the session's input folder is shared
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), tuple(random.randrange(256) for _ in range(3))).save(buffer, format="PNG")
    return buffer.getvalue()


def _age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


async def _submit(env: Env, image: bytes | None = None, **options: object) -> object:
    # with an image the result takes the image's size; without, 64x64
    options.update({"image": ImageUpload(filename="in.png", content_type="image/png", data=image)} if image
                   else {"width": 64, "height": 64})
    request = await env.studio.generations.parse({"prompt": "a fox", "steps": 4, "negative": uuid.uuid4().hex, **options})
    return await env.studio.generations.submit(request, WHO, _origin(env.channel))


def _engine_rows(env: Env) -> dict[str, str]:
    with sqlite3.connect(env.settings.bot.database) as conn:
        return dict(conn.execute("SELECT job_id, state FROM engine_jobs"))


def _age_engine_rows(env: Env, seconds: float) -> None:
    with sqlite3.connect(env.settings.bot.database) as conn:
        conn.execute("UPDATE engine_jobs SET updated_at = updated_at - ?", (seconds,))


async def _first_pass(env: Env) -> None:
    """The pass the Studio's start began: waited for, so the test's own files meet only the test's passes."""
    await asyncio.wait_for(env.studio.results.retention.passed.wait(), WAIT)


async def test_old_uploads_and_job_rows_go_and_a_queued_requests_upload_stays(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await _first_pass(env)
    input_dir = env.settings.engine.input_dir
    uploads = input_dir / env.settings.bot.uploads_folder
    finished = await env.finish(await _submit(env, _png(), seed=1))
    done_upload = _age(input_dir / finished.generation.params["init_image"], OLD)
    # one request held running, one with its own upload queued behind it
    gate = Gate(monkeypatch)
    running = await _submit(env, seed=GATE_SEED)
    await gate.wait_entered()
    try:
        queued = await _submit(env, _png(), seed=2)
        queued_upload = _age(input_dir / (await env.store.get(queued.generation_id)).params["init_image"], OLD)
        fresh = _write(uploads / f"fresh-{uuid.uuid4().hex}.png")
        stray = _age(_write(uploads / "2020" / f"stray-{uuid.uuid4().hex}.png"), OLD)
        outside = _age(_write(input_dir / f"owner-{uuid.uuid4().hex}.png"), OLD)
        link = uploads / f"link-{uuid.uuid4().hex}.png"
        link.symlink_to(outside)
        _age_engine_rows(env, OLD)

        pruned = await env.studio.results.retention.prune()
    finally:
        gate.open()

    assert not done_upload.exists() and not stray.exists()
    assert queued_upload.exists() and fresh.exists()  # still queued; new
    assert outside.exists() and link.is_symlink()  # outside the uploads folder; a link is never followed
    rows = _engine_rows(env)
    assert finished.generation.jobs[0].job_id not in rows  # it ended 40 days ago
    assert rows[running.job_id] == "running" and rows[queued.job_id] == "queued"
    assert (pruned.uploads, pruned.job_rows, pruned.results) == (2, 1, 0)
    # the bot's own history keeps the request; a reroll says what is gone instead of failing in the engine
    assert (await env.store.get(finished.generation.id)).state == "done"
    with pytest.raises(RequestInvalid, match="is gone from the input folder"):
        await env.studio.generations.reroll(finished.generation.id, WHO)
    assert (await env.finish(queued)).kind == "done"  # its upload was there when it ran
    await env.finish(running)
    for path in (fresh, link, outside):
        path.unlink()


async def test_results_go_only_when_asked_and_then_as_a_delete_does(
        settings: Settings, bot_executor: object) -> None:
    settings = settings.model_copy(update={"retention": RetentionSettings(results_days=30)})
    env = await Env(settings, bot_executor).start()  # type: ignore[arg-type]
    try:
        await _first_pass(env)
        old = (await env.run({"prompt": "an old one", "seed": 3})).generation
        new = (await env.run({"prompt": "a new one", "seed": 4})).generation
        with sqlite3.connect(settings.bot.database) as conn:
            conn.execute("UPDATE generations SET finished_at = finished_at - ? WHERE id = ?", (OLD, old.id))
        for path in old.images:
            _age(Path(path), OLD)
        results = env.settings.engine.output_dir / env.settings.bot.results_folder
        stray = _age(_write(results / "1999-01-01" / f"stray-{uuid.uuid4().hex}.png"), OLD)
        elsewhere = _age(_write(env.settings.engine.output_dir / f"mine-{uuid.uuid4().hex}.png"), OLD)

        pruned = await env.studio.results.retention.prune()

        assert pruned.results == 1 and pruned.result_files == 2
        assert not any(Path(p).exists() for p in old.images) and not stray.exists()
        assert not stray.parent.exists()  # the emptied date folder goes too
        assert all(Path(p).exists() for p in new.images) and elsewhere.exists()
        assert (await env.store.get(old.id)).state == "deleted"  # the row stays, as after 🗑️
        assert (await env.store.get(new.id)).state == "done"
        elsewhere.unlink()
    finally:
        await env.stop()


async def test_results_stay_by_default_and_nothing_runs_with_every_limit_off(env: Env) -> None:
    await _first_pass(env)
    old = (await env.run({"prompt": "kept for ever", "seed": 5})).generation
    with sqlite3.connect(env.settings.bot.database) as conn:
        conn.execute("UPDATE generations SET finished_at = finished_at - ? WHERE id = ?", (OLD, old.id))
    for path in old.images:
        _age(Path(path), OLD)
    assert env.settings.retention.results_days == 0
    assert (await env.studio.results.retention.prune()).results == 0
    assert all(Path(p).exists() for p in old.images)
    off = Retention(env.store, env.settings.bot, RetentionSettings(uploads_days=0, job_rows_days=0, results_days=0),
                    input_dir=env.settings.engine.input_dir, output_dir=env.settings.engine.output_dir)
    off.start()
    assert not off.enabled and off._task is None
    await off.stop()


async def test_delete_takes_the_source_upload_unless_another_result_loads_it(env: Env) -> None:
    image = _png()
    first = (await env.finish(await _submit(env, image, seed=6))).generation
    second = (await env.finish(await _submit(env, image, seed=7))).generation
    source = env.settings.engine.input_dir / first.params["init_image"]
    assert second.params["init_image"] == first.params["init_image"] and source.exists()  # one file for both

    await env.studio.generations.delete(first.id, WHO)
    assert source.exists()  # the second result still loads it (a reroll of it needs it)
    await env.studio.generations.delete(second.id, WHO)
    assert not source.exists()
    assert not any(Path(p).exists() for p in first.images + second.images)


async def test_delete_never_takes_an_input_file_outside_the_uploads_folder(env: Env) -> None:
    """A /workflow's LoadImage of a file the server owner put in input/: deleting its result leaves the file."""
    from tests.bot.core.services.test_workflows import as_file
    from tests.engine.conftest import txt2img

    mine = _write(env.settings.engine.input_dir / f"owner-{uuid.uuid4().hex}.png")
    workflow = txt2img(init_image=mine.name, denoise=0.5, seed=8)
    ticket = await env.studio.workflows.run(as_file(workflow), "graph.json", WHO, Origin(str(env.channel.id), "777"))
    generation = (await env.finish(ticket)).generation
    assert generation.state == "done"
    await env.studio.generations.delete(generation.id, WHO)
    assert mine.exists()
    mine.unlink()


def _write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png())
    return path


async def test_results_retention_keeps_what_is_not_posted_yet_and_a_pending_requests_ended_images(
        tmp_path: Path) -> None:
    # A: image 1 of two ended 40 days ago, then the bot was down (image 2 runs again): its PNG is named by its job's
    # result alone until the request settles. B: done 40 days ago, never posted (Discord away): still to post.
    from bot.core.storage.records import NewGeneration, Outcome
    from bot.core.storage.store import Store
    from bot.settings import BotSettings

    store = await Store.open(tmp_path / "noodle.sqlite3")
    output, old = tmp_path / "output", time.time() - OLD
    (output / "noodle" / "1999-01-01").mkdir(parents=True)

    def png(name: str) -> tuple[Path, dict[str, object]]:
        path = _age(_write(output / "noodle" / "1999-01-01" / name), OLD)
        return path, {"outputs": {"9": {"images": [{"filename": name, "subfolder": "noodle/1999-01-01",
                                                    "type": "output"}]}}, "meta": {}}

    pending = await store.add(NewGeneration("imagine", "discord", "u", {}, {}, "m", [(1, {}), (2, {})]),
                              created_at=old)
    await store.attach_job(pending.id, 1, "a1")
    await store.attach_job(pending.id, 2, "a2")
    await store.mark_queued(pending.id)
    first, result = png("a1.png")
    await store.end_job("a1", "done", result=result, finished_at=old)
    unposted = await store.add(NewGeneration("imagine", "discord", "u", {}, {}, "m", [(3, {})]), created_at=old)
    await store.attach_job(unposted.id, 1, "b1")
    waiting, result = png("b1.png")
    await store.end_job("b1", "done", result=result, finished_at=old)
    await store.settle(unposted.id, Outcome("done", {1: str(waiting.resolve())}, {}, [], {}, None, old))
    retention = Retention(store, BotSettings(database=tmp_path / "noodle.sqlite3"),
                          RetentionSettings(results_days=30), input_dir=tmp_path / "input", output_dir=output)
    try:
        assert await retention.prune() == Pruned()
        assert first.is_file() and waiting.is_file()
        assert [g.id for g in await store.unposted("discord")] == [unposted.id]
        await store.mark_posted(unposted.id, "42", old)  # posted at last: now it is an old result like any other
        assert (await retention.prune()).results == 1 and not waiting.exists() and first.is_file()
    finally:
        await store.close()


async def test_a_reroll_of_an_old_img2img_keeps_its_upload_from_a_pass_already_under_way(env: Env) -> None:
    # a 🔁 loads its parent's upload again without saving it: it is touched as it is queued, and a pass that listed
    # the file before that checks its age again before removing it
    await _first_pass(env)
    finished = await env.finish(await _submit(env, _png(), seed=1))
    upload = _age(env.settings.engine.input_dir / finished.generation.params["init_image"], OLD)
    listed = [upload]  # what a pass running now found old
    reroll = await env.studio.generations.reroll(finished.generation.id, WHO)
    assert upload.stat().st_mtime > time.time() - 60
    assert still_expired(listed, time.time() - DAY) == []
    assert (await env.finish(reroll)).kind == "done"
    assert (await env.studio.results.retention.prune()).uploads == 0 and upload.exists()
