"""A full disk, for real: a small tmpfs holding the database, output/ and input/, filled while a job runs.

The job that hit it fails with a message naming the disk, its follower hears so at once (not after the
300 s publish timeout), no row stays queued or running once space is back, no PNG of it is left, and the
next job succeeds. Mounting needs root; where it is refused those tests skip, and the free-space check
(`[limits] min_free_disk_mb`) is tested on the ordinary disk with a threshold no disk meets.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.core.requests.imagine import ImageUpload
from bot.settings import BotSettings, Settings
from bot.core.front_end import Requester
from engine.disk import DiskFull
from engine.errors import NodeExecutionError
from engine.executor import Executor
from engine.nodes import images
from engine.pngmeta import save_png
from engine.queue import JobState
from engine.settings import ModelsSettings
from tests.bot.conftest import Env, _origin
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img
from tests.engine.disk_support import SmallDisk, small_disk  # noqa: F401 (a fixture)
from tests.engine.queue.service_support import GATE_SEED, Gate

WHO = Requester("42", "777")
NOWHERE = 10**9  # MiB to keep free: about a petabyte, more than any test machine's disk has


def _executor(tiny_models: Path, root: Path, keep_mb: int) -> Executor:
    return tiny_executor(tiny_models, root, Settings().limits.model_copy(update={"min_free_disk_mb": keep_mb}))


def _settings(tiny_models: Path, executor: Executor, database: Path) -> Settings:
    return Settings(models=ModelsSettings(dir=tiny_models), engine=executor.settings, limits=executor.limits,
                    bot=BotSettings(database=database, default_model="tiny-sd15.safetensors", default_steps=4,
                                    status_edit_seconds=0.5))


@pytest.fixture
async def disk_env(small_disk: SmallDisk, tiny_models: Path) -> AsyncIterator[Env]:
    """Noodle with everything on the small disk and no free-space margin, so writes really hit ENOSPC."""
    executor = _executor(tiny_models, small_disk.root, 0)
    env = await Env(_settings(tiny_models, executor, small_disk.root / "noodle.sqlite3"), executor).start()
    try:
        yield env
    finally:
        await env.stop()


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix == ".png" or p.name.endswith(".part")))


def _states(database: Path) -> dict[str, list[str]]:
    with sqlite3.connect(database) as conn:
        return {table: [row[0] for row in conn.execute(f"SELECT state FROM {table}")]
                for table in ("engine_jobs", "generations", "generation_jobs")}


async def test_a_disk_that_fills_during_a_job_fails_that_job_and_keeps_nothing_of_it(
        disk_env: Env, small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    env = disk_env
    gate = Gate(monkeypatch)
    request = await env.studio.generations.parse({"prompt": "a fox", "steps": 4, "width": 64, "height": 64, "seed": GATE_SEED,
                                      "negative": uuid.uuid4().hex})
    ticket = await env.studio.generations.submit(request, WHO, _origin(env.channel))
    await gate.wait_entered()
    try:
        small_disk.fill()  # while the job samples: its PNG and every database write after it find no room
    finally:
        gate.open()
    # within the test's wait (120 s), not the 300 s publish timeout it took before
    final = await env.finish(ticket)
    assert final.kind == "failed"
    assert "the disk holding output/ is full (No space left on device)" in final.error
    assert "free space on it" in final.error
    assert _pngs(small_disk.root / "output") == []  # not even the half-written one

    small_disk.free()
    after = await env.run({"prompt": "room again", "seed": 5})
    assert after.kind == "done" and len(after.generation.images) == 1
    states = _states(env.settings.bot.database)
    assert sorted(states["engine_jobs"]) == ["done", "failed"]
    assert sorted(states["generations"]) == ["done", "failed"]
    assert sorted(states["generation_jobs"]) == ["done", "failed"]
    failed = await env.store.get(ticket.generation_id)
    assert failed.state == "failed" and "the disk holding output/ is full" in failed.error
    assert [Path(p).name for p in _pngs(small_disk.root / "output")] == [Path(after.generation.images[0]).name]


async def test_a_full_database_fails_the_request_it_cannot_record_and_removes_its_pngs(
        disk_env: Env, small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG fits but SQLite's file cannot grow: the images are removed, the request fails and says why."""
    env = disk_env
    written: list[Path] = []

    def save_then_fill(image: Image.Image, path: Path, texts: dict[str, str], **options: Any) -> None:
        save_png(image, path, texts, **options)  # the real write, whole; then the disk is full for what comes after
        written.append(path)
        small_disk.fill()

    monkeypatch.setattr(images, "save_png", save_then_fill)
    final = await env.run({"prompt": "a heron", "seed": 11})
    assert final.kind == "failed"
    assert "the disk holding the database (noodle.sqlite3) is full, so Noodle could not record this request and " \
           "removed its images: free space on it" in final.error
    assert len(written) == 1 and not written[0].exists()
    assert _pngs(small_disk.root / "output") == []
    monkeypatch.undo()
    small_disk.free()
    assert (await env.run({"prompt": "room again", "seed": 6})).kind == "done"
    states = _states(env.settings.bot.database)
    assert "running" not in states["engine_jobs"] and "queued" not in states["engine_jobs"]
    assert sorted(states["generations"]) == ["done", "failed"]


async def test_a_free_space_margin_refuses_the_job_before_writing(small_disk: SmallDisk, tiny_models: Path) -> None:
    """16 MiB free, 64 MiB kept: SaveImage refuses with the numbers and the setting, the next job after the
    margin is lowered runs (a new process reading config.toml: here, a new engine on the same database)."""
    executor = _executor(tiny_models, small_disk.root, 64)
    database = small_disk.root / "noodle.sqlite3"
    env = await Env(_settings(tiny_models, executor, database), executor).start()
    try:
        final = await env.run({"prompt": "kept free", "seed": 7})
        assert final.kind == "failed"
        # 16 MiB less the database beside it
        assert re.search(r"the disk holding output/ has 1[0-5] MiB free; Noodle keeps 64 MiB free \(\[limits\] "
                         r"min_free_disk_mb in config.toml\): free space or lower it", final.error), final.error
        assert _pngs(small_disk.root / "output") == []
    finally:
        await env.stop()
    lowered = _executor(tiny_models, small_disk.root, 1)
    env = await Env(_settings(tiny_models, lowered, database), lowered).start()
    try:
        assert (await env.run({"prompt": "kept free", "seed": 7})).kind == "done"
    finally:
        await env.stop()


def test_a_batch_that_does_not_fit_leaves_none_of_its_pngs(small_disk: SmallDisk, tiny_models: Path) -> None:
    """Three images, room for about one and a half: the first is written, the second fails, both go."""
    executor = _executor(tiny_models, small_disk.root, 0)
    workflow = txt2img(batch_size=3, filename_prefix="batch")
    one = executor.run(txt2img(filename_prefix="probe"))  # one image's real size on this disk
    [probe] = _pngs(small_disk.root / "output")
    size = probe.stat().st_size
    probe.unlink()
    assert one.outputs
    small_disk.fill(leave=size * 3 // 2)
    with pytest.raises(NodeExecutionError) as failed:
        executor.run(workflow)
    assert isinstance(failed.value.cause, DiskFull)
    assert "the disk holding output/ is full (No space left on device)" in str(failed.value)
    assert _pngs(small_disk.root / "output") == []


async def test_a_write_that_would_leave_too_little_free_is_refused(tmp_path: Path, tiny_models: Path) -> None:
    """Runs anywhere: a margin no disk meets refuses SaveImage and an upload, and leaves no file or row."""
    executor = _executor(tiny_models, tmp_path, NOWHERE)
    env = await Env(_settings(tiny_models, executor, tmp_path / "noodle.sqlite3"), executor).start()
    try:
        final = await env.run({"prompt": "nowhere to put it", "seed": 9})
        assert final.kind == "failed"
        assert f"MiB free; Noodle keeps {NOWHERE} MiB free ([limits] min_free_disk_mb in config.toml): free " \
               "space or lower it" in final.error
        assert "the disk holding output/ has " in final.error
        assert _pngs(tmp_path / "output") == []

        buffer = tmp_path / "start.png"
        Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer)
        with pytest.raises(DiskFull, match=r"the disk holding input/ has \d+ MiB free; Noodle keeps"):
            await env.studio.generations.submit(await env.studio.generations.parse(
                {"prompt": "from a picture", "steps": 4, "image": _attachment(buffer.read_bytes())}), WHO,
                _origin(env.channel))
        assert list((tmp_path / "input").rglob("*.png")) == []
        assert [g.id for g in await env.store.recent()] == [final.generation.id]
    finally:
        await env.stop()


def _attachment(data: bytes) -> ImageUpload:
    return ImageUpload(filename="start.png", content_type="image/png", data=data)


async def test_a_commit_the_database_refuses_is_reported_as_itself(env: Env) -> None:
    """SQLITE_FULL on the bot's connection (max_page_count: SQLite's own "the file may not grow"): the caller
    sees "database or disk is full", never a "cannot rollback" raised while cleaning up after it."""
    final = await env.run({"prompt": "one to end", "seed": 3})
    pages = (await env.store._db.execute_fetchall("PRAGMA page_count"))[0][0]
    await env.store._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        for write in (env.store.put_setting("user", "42", "notes", "x" * 200_000),
                      env.store.mark_posted(final.generation.id, "x" * 200_000, 0.0)):
            with pytest.raises(DiskFull, match="the disk holding the database \\(noodle.sqlite3\\) is full") as caught:
                await write
            cause = caught.value.__cause__
            assert isinstance(cause, sqlite3.OperationalError) and str(cause) == "database or disk is full"
        # a member's command on a full database: one clear refusal, nothing queued
        jobs = len(env.engine.jobs(states=tuple(JobState)))
        request = await env.studio.generations.parse({"prompt": "a fox " + "very " * 700, "steps": 4, "width": 64,
                                          "height": 64})
        with pytest.raises(DiskFull, match="nothing was queued or changed"):
            await env.studio.generations.submit(request, Requester("42", "777"))
        assert len(env.engine.jobs(states=tuple(JobState))) == jobs
    finally:
        await env.store._db.execute("PRAGMA max_page_count = 1073741823")
    assert (await env.store.get(final.generation.id)).message_id == final.generation.message_id  # nothing half done
    await env.store.put_setting("user", "42", "notes", "fits again")  # the connection is usable after it
    assert await env.store.get_setting("user", "42", "notes") == "fits again"
