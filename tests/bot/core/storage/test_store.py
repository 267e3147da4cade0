"""The SQLite history on a real file: WAL, `PRAGMA user_version` migrations, the life of a generation."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot.core.storage.records import NewGeneration, Outcome
from bot.core.storage.schema import MIGRATIONS, StoreError, migrate
from bot.core.storage.store import Store


def _new(images: int = 2) -> NewGeneration:
    return NewGeneration(kind="imagine", front="discord", requester_id="42", request={"prompt": "a fox"},
                         params={"prompt": "a fox", "seed": 5}, model_name="tiny-sd15.safetensors",
                         images=[(5 + n, {"3": {"class_type": "KSampler", "inputs": {"seed": 5 + n}}})
                                 for n in range(images)], guild_id="777", channel_id="555")


async def test_a_new_file_is_wal_and_at_the_latest_version(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        assert await store.schema_version() == len(MIGRATIONS)
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "n.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"generations", "generation_jobs", "presets", "settings"} <= tables


async def test_a_migration_moves_an_old_file_up_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    store = await Store.open(path)
    kept = await store.add(_new())
    await store.close()
    import aiosqlite

    later = (*MIGRATIONS, "ALTER TABLE generations ADD COLUMN note TEXT;")
    async with aiosqlite.connect(path) as db:
        assert await migrate(db, path, later) == len(later)
        async with db.execute("PRAGMA user_version") as cursor:
            assert (await cursor.fetchone())[0] == len(later)
        async with db.execute("SELECT id, note FROM generations") as cursor:
            assert await cursor.fetchall() == [(kept.id, None)]


async def test_a_file_from_a_newer_noodle_or_not_sqlite_is_refused_with_what_to_do(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StoreError, match="written by a newer Noodle; upgrade Noodle or use another"):
        await Store.open(newer)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot be used as Noodle's database"):
        await Store.open(junk)


async def test_a_generation_from_accepted_to_posted_to_deleted(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        generation = await store.add(_new(), created_at=100.0)
        assert generation.state == "submitting" and [j.seed for j in generation.jobs] == [5, 6]
        await store.attach_job(generation.id, 1, "job-a")
        await store.attach_job(generation.id, 2, "job-b")
        await store.mark_queued(generation.id)
        assert await store.mark_running("job-a", 101.0) == generation.id
        assert (await store.by_job("job-b")).state == "running"
        await store.end_job("job-a", "done", result={"outputs": {}, "meta": {}}, finished_at=102.0)
        assert not (await store.get(generation.id)).all_ended
        await store.end_job("job-b", "failed", error="out of memory", finished_at=102.5)
        ended = await store.get(generation.id)
        assert ended.all_ended and ended.jobs[1].error == "out of memory"
        outcome = Outcome(state="done", images={1: "/tmp/a.png"}, tokens={"6": {"tokens": 3}}, cached=["4"],
                          timings={"total": 1.5}, model_hash="abc", finished_at=103.0, error="image 2 failed")
        assert await store.settle(generation.id, outcome)
        assert not await store.settle(generation.id, outcome)  # once
        assert [g.id for g in await store.unposted("discord")] == [generation.id]
        await store.mark_posted(generation.id, "123456789", 104.0)
        posted = await store.by_message(123456789)
        assert posted.images == ["/tmp/a.png"] and posted.image_seeds == [5] and posted.queue_wait_s == 1.0
        assert posted.model_hash == "abc" and posted.cached == ["4"] and posted.error == "image 2 failed"
        assert not await store.unposted("discord") and not await store.pending()
        await store.mark_deleted(generation.id, 105.0)
        deleted = await store.get(generation.id)
        assert deleted.state == "deleted" and deleted.images == [] and deleted.is_terminal
    finally:
        await store.close()


async def test_a_refused_request_leaves_no_row(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        generation = await store.add(_new())
        await store.discard(generation.id)
        assert await store.get(generation.id) is None and await store.recent() == []
        await store.put_setting("guild", "777", "default_steps", 30)
        await store.put_setting("guild", "777", "default_steps", 25)
        assert await store.get_setting("guild", "777", "default_steps") == 25
        assert await store.get_setting("guild", "778", "default_steps") is None
    finally:
        await store.close()


async def test_a_job_whose_events_came_first_is_not_moved_back_to_queued(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "n.sqlite3")
    try:
        generation = await store.add(_new(images=1))
        await store.attach_job(generation.id, 1, "fast")  # adopted from the engine's own event
        await store.end_job("fast", "done", result={})
        await store.attach_job(generation.id, 1, "fast")  # the Studio's own bookkeeping, later
        assert (await store.by_job("fast")).jobs[0].state == "done"
    finally:
        await store.close()


async def test_a_store_opens_while_something_keeps_every_statement_result_alive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # whatever holds aiosqlite's futures (an event-loop harness, a debugger) keeps their sqlite3 cursors alive:
    # a cursor the store left open (WAL's answer row) kept its statement in progress and the first migration's
    # COMMIT failed with "cannot commit transaction - SQL statements in progress"
    import aiosqlite

    held: list[object] = []
    run_on_thread = aiosqlite.Connection._execute

    async def keeping(self: aiosqlite.Connection, fn: object, *args: object, **kwargs: object) -> object:
        result = await run_on_thread(self, fn, *args, **kwargs)
        held.append(result)
        return result

    monkeypatch.setattr(aiosqlite.Connection, "_execute", keeping)
    store = await Store.open(tmp_path / "held.sqlite3")
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        added = await store.add(_new())
        await store.mark_queued(added.id)
        assert (await store.get(added.id)).state == "queued"
    finally:
        await store.close()
    assert any(isinstance(result, sqlite3.Cursor) for result in held)


async def test_two_processes_opening_a_new_file_at_once_both_get_it(tmp_path: Path) -> None:
    # the bot and a `noodle chat` started together: the second read user_version 0 before the first committed its
    # migration, then failed on "table generations already exists" and blamed the file
    # and switching a new file to WAL at the same moment answered "database is locked" without waiting (about 1 open
    # in 20 with four at once)
    for attempt in range(15):
        path = tmp_path / f"together-{attempt}.sqlite3"
        opened = await asyncio.gather(*(Store.open(path) for _ in range(4)), return_exceptions=True)
        assert not [o for o in opened if isinstance(o, BaseException)], opened
        for store in opened:
            await store.close()  # type: ignore[union-attr]
