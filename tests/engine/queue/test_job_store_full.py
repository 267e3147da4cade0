"""The queue's store when SQLite cannot write: the real error is raised (never "cannot rollback"), the rows
that could not be written are kept and land with the next write that can, so no job stays "running"."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine.disk import is_disk_full
from engine.queue.jobs import JobRecord, JobState
from engine.queue.job_store import JobStore
from tests.engine.disk_support import SmallDisk, small_disk  # noqa: F401 (a fixture)
from tests.engine.queue.test_job_store import job


def _states(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as other:  # the bot's connection: only what reached the file counts
        return dict(other.execute("SELECT job_id, state FROM engine_jobs"))


def _cap_pages(store: JobStore) -> None:
    # max_page_count is a per-connection limit, so it is set on the store's own connection: SQLite then
    # answers SQLITE_FULL ("database or disk is full") exactly as a full disk makes it do
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def _stored(path: Path, *names: str) -> tuple[JobStore, list[JobRecord]]:
    """A store at `path` holding a queued job of each name, in that order."""
    store = JobStore(path)
    jobs = [job(name, seq) for seq, name in enumerate(names, start=1)]
    for each in jobs:
        store.insert(each)
    return store, jobs


def test_a_full_database_reports_itself_and_the_row_lands_with_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "noodle.sqlite3"
    store, (ran, other) = _stored(path, "ran", "other")
    ran.state = JobState.RUNNING
    store.save([ran])
    _cap_pages(store)
    ran.state, ran.result = JobState.DONE, {"outputs": {}, "meta": {"big": "x" * 200_000}}  # needs new pages
    with pytest.raises(sqlite3.OperationalError, match="^database or disk is full$") as failed:
        store.save([ran])
    assert is_disk_full(failed.value)
    assert store.unsaved == ["ran"] and _states(path)["ran"] == "running"

    store._db.execute("PRAGMA max_page_count = 1073741823")  # room again
    other.state = JobState.RUNNING
    store.save([other])
    assert store.unsaved == []
    assert _states(path) == {"ran": "done", "other": "running"}
    assert store.get("ran").result == ran.result
    store.close()


def test_a_newer_state_wins_over_the_one_that_could_not_be_written(tmp_path: Path) -> None:
    path = tmp_path / "noodle.sqlite3"
    store, (first,) = _stored(path, "a")
    _cap_pages(store)
    first.state, first.error = JobState.FAILED, "x" * 100_000
    with pytest.raises(sqlite3.OperationalError):
        store.save([first])
    store._db.execute("PRAGMA max_page_count = 1073741823")
    first.state, first.error = JobState.CANCELLED, "cancelled"
    store.save([first])
    assert _states(path) == {"a": "cancelled"} and store.get("a").error == "cancelled"
    store.close()


def test_on_a_really_full_disk_the_commit_error_is_the_one_raised(small_disk: SmallDisk) -> None:
    path = small_disk.root / "noodle.sqlite3"
    store, (ran,) = _stored(path, "ran")
    small_disk.fill()
    ran.state, ran.result = JobState.DONE, {"outputs": {}, "meta": {}}
    with pytest.raises(sqlite3.OperationalError, match="^database or disk is full$"):
        store.save([ran])  # the WAL cannot grow: COMMIT fails, and SQLite has ended the transaction itself
    assert store.unsaved == ["ran"]
    small_disk.free()
    store.save([])
    assert _states(path) == {"ran": "done"}
    store.close()


def test_a_database_locked_past_the_timeout_keeps_the_rows_and_the_lines_for_the_next_write(tmp_path: Path) -> None:
    # another connection holding the write lock fails the save at BEGIN, before the UPDATEs: the ended job and the
    # moved place in line must still land later, or the job runs again after a restart
    path = tmp_path / "noodle.sqlite3"
    store, (ran, waiting) = _stored(path, "ran", "waiting")
    store._db.execute("PRAGMA busy_timeout = 50")  # the store waits 10 s; the test does not
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    ran.state = JobState.DONE
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        store.save([ran], lines={"waiting": 7})
    assert store.unsaved == ["ran"]
    holder.execute("ROLLBACK")
    holder.close()
    store.save([])
    assert _states(path) == {"ran": "done", "waiting": "queued"} and store.get("waiting").line == 7
    store.close()
