"""The queue's SQLite store: WAL, its own schema version beside the bot's tables, rows that survive reopening."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from engine.errors import NoodleError
from engine.queue.jobs import JobRecord, JobState, Owner
from engine.queue.job_store import SCHEMA_VERSION, JobStore


def job(job_id: str, seq: int, user: str = "ann", **fields: object) -> JobRecord:
    return JobRecord(job_id, Owner(user, "g1"), {"9": {"class_type": "SaveImage", "inputs": {}}}, {"channel": 7},
                     created_at=1000.0 + seq, seq=seq, line=seq, **fields)  # type: ignore[arg-type]


def test_a_job_is_readable_from_another_connection_as_soon_as_insert_returns(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "noodle.sqlite3")
    store.insert(job("a", 1))
    with sqlite3.connect(tmp_path / "noodle.sqlite3") as other:  # the bot's connection, say
        assert other.execute("SELECT job_id, state, user_id FROM engine_jobs").fetchall() == [("a", "queued", "ann")]
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()


def test_state_changes_and_lines_are_written_together_and_read_back(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "noodle.sqlite3")
    first, second = job("a", 1), job("b", 2, "bob")
    store.insert(first)
    store.insert(second)
    first.state, first.attempts = JobState.RUNNING, 1
    store.save([first], lines={"b": 9})
    store.close()

    reopened = JobStore(tmp_path / "noodle.sqlite3")
    active = reopened.active()
    assert [(j.job_id, j.state, j.attempts, j.line) for j in active] == [
        ("a", JobState.RUNNING, 1, 1), ("b", JobState.QUEUED, 0, 9)]
    assert active[1].owner == Owner("bob", "g1") and active[1].extra == {"channel": 7}
    first.state, first.result = JobState.DONE, {"prompt_id": "a", "outputs": {}, "meta": {}}
    reopened.save([first])
    assert [j.job_id for j in reopened.active()] == ["b"]
    done = reopened.get("a")
    assert done is not None and done.result == first.result and reopened.get("zzz") is None


def test_the_engine_keeps_its_own_schema_version_and_leaves_the_bots_alone(tmp_path: Path) -> None:
    path = tmp_path / "noodle.sqlite3"
    with sqlite3.connect(path) as bot:
        bot.execute("PRAGMA user_version = 7")
        bot.execute("CREATE TABLE generations (id INTEGER PRIMARY KEY)")
    JobStore(path).close()
    JobStore(path).close()  # opening twice migrates once
    with sqlite3.connect(path) as bot:
        assert bot.execute("PRAGMA user_version").fetchone() == (7,)
        assert bot.execute("SELECT version FROM engine_schema").fetchall() == [(SCHEMA_VERSION,)]
        tables = {row[0] for row in bot.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"generations", "engine_jobs", "engine_schema"} <= tables


def test_a_database_from_a_newer_engine_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "noodle.sqlite3"
    JobStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE engine_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(NoodleError, match="newer Noodle.*upgrade Noodle or point \\[bot\\] database"):
        JobStore(path)


def test_writes_from_several_threads_all_land(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "noodle.sqlite3")
    threads = [threading.Thread(target=lambda n=n: store.insert(job(f"j{n}", n))) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [j.job_id for j in store.active()] == [f"j{n}" for n in range(16)]
    store.close()
