"""The queue's persistence: every job and each change of its state, in the bot's SQLite file.

One `engine_jobs` table, versioned in `engine_schema` (the bot keeps `PRAGMA user_version` for its own
tables in the same file). WAL mode, so the bot's connection reads while the engine writes, and
`synchronous=FULL`: a job is on disk when `insert` returns, through `kill -9` and power loss alike.
Writes are one small statement each. The service calls `insert` from a thread off the event loop
before `submit` returns; the worker thread writes the state changes of the jobs it runs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.errors import NoodleError
from engine.queue.jobs import JobRecord, JobState, Owner

__all__ = ["SCHEMA_VERSION", "JobStore"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS engine_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS engine_jobs (
    job_id      TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    guild_id    TEXT,
    state       TEXT NOT NULL,
    seq         INTEGER NOT NULL,   -- FairQueue order: submission tick
    line        INTEGER NOT NULL,   -- FairQueue order: the user's place in line
    attempts    INTEGER NOT NULL DEFAULT 0,
    front       INTEGER NOT NULL DEFAULT 0, -- put back after it started: runs before the round-robin
    workflow    TEXT NOT NULL,      -- API-format JSON
    extra       TEXT NOT NULL,      -- JSON the front end stored
    error       TEXT,
    result      TEXT,               -- RunResult.to_dict() JSON
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS engine_jobs_state ON engine_jobs (state, seq);
"""
_COLUMNS = "job_id, user_id, guild_id, state, seq, line, attempts, front, workflow, extra, error, result, created_at"


class JobStore:
    """The jobs table of one database file; safe to call from several threads (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # state changes a failed write could not store (a full disk), by job: written with the next save
        self._unsaved: dict[str, tuple[Any, ...]] = {}
        self._unsaved_lines: dict[str, int] = {}  # places in line a failed save did not write
        # autocommit: each statement is its own transaction unless `_transaction` groups them
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                row = self._db.execute("SELECT MAX(version) FROM engine_schema").fetchone()
                if row[0] is None:
                    self._db.execute("INSERT INTO engine_schema (version) VALUES (?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise NoodleError(
                        f"database {self.path} holds the engine's job table at version {row[0]}, written by a newer "
                        f"Noodle (this one knows version {SCHEMA_VERSION}); upgrade Noodle or point [bot] database "
                        "in config.toml at another file")
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Undo an open transaction; after a failed COMMIT SQLite may have ended it already (SQLITE_FULL does),
        and a ROLLBACK then would raise "no transaction is active" in place of the real error."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def insert(self, job: JobRecord) -> None:
        """Store a new job (durable when this returns)."""
        with self._lock:
            self._db.execute(
                f"INSERT INTO engine_jobs ({_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.owner.user_id, job.owner.guild_id, str(job.state), job.seq, job.line, job.attempts,
                 int(job.front), json.dumps(job.workflow), json.dumps(job.extra), job.error, _json_or_none(job.result),
                 job.created_at, time.time()))

    def save(self, jobs: Iterable[JobRecord], lines: Mapping[str, int] | None = None) -> None:
        """Write the state, attempts, error and result of `jobs`, and changed places in line, at once.

        When the write fails (a full disk) the error is raised and the rows are kept: the next save that
        succeeds writes them too, so a job that ended meanwhile is not left "running" in the table."""
        now = time.time()
        with self._lock:
            pending = dict(self._unsaved)
            for j in jobs:  # the latest state of a job wins over one that could not be written before
                pending[j.job_id] = (str(j.state), j.attempts, int(j.front), j.error, _json_or_none(j.result),
                                     j.seq, j.line, now, j.job_id)
            moved = {**self._unsaved_lines, **(lines or {})}
            try:
                # inside the try: a database locked past the timeout (or read-only) fails at BEGIN, and the rows
                # must be kept then as when the COMMIT fails, or a job that ended would run again after a restart
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "UPDATE engine_jobs SET state = ?, attempts = ?, front = ?, error = ?, result = ?, seq = ?, "
                    "line = ?, updated_at = ? WHERE job_id = ?", list(pending.values()))
                self._db.executemany("UPDATE engine_jobs SET line = ?, updated_at = ? WHERE job_id = ?",
                                     [(line, now, job_id) for job_id, line in moved.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                self._unsaved, self._unsaved_lines = pending, moved
                raise
            self._unsaved.clear()
            self._unsaved_lines.clear()

    @property
    def unsaved(self) -> list[str]:
        """Jobs whose latest state is not in the table yet (a write failed; the next save retries it)."""
        with self._lock:
            return list(self._unsaved)

    def prune_finished(self, before: float) -> int:
        """Delete the rows of jobs that ended (done, failed, cancelled) before `before`; queued and running stay."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM engine_jobs WHERE state IN (?, ?, ?) AND updated_at < ?",
                                      (str(JobState.DONE), str(JobState.FAILED), str(JobState.CANCELLED), before))
            return cursor.rowcount

    def active(self) -> list[JobRecord]:
        """Queued and running jobs, in submission order: what a restart picks up."""
        return self._select("WHERE state IN (?, ?) ORDER BY seq", (str(JobState.QUEUED), str(JobState.RUNNING)))

    def get(self, job_id: str) -> JobRecord | None:
        found = self._select("WHERE job_id = ?", (job_id,))
        return found[0] if found else None

    def _select(self, where: str, params: tuple[Any, ...]) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM engine_jobs {where}", params).fetchall()
        return [_record(row) for row in rows]


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _record(row: tuple[Any, ...]) -> JobRecord:
    job_id, user_id, guild_id, state, seq, line, attempts, front, workflow, extra, error, result, created_at = row
    return JobRecord(job_id=job_id, owner=Owner(user_id, guild_id), workflow=json.loads(workflow),
                     extra=json.loads(extra), created_at=created_at, seq=seq, line=line, state=JobState(state),
                     attempts=attempts, front=bool(front), error=error,
                     result=None if result is None else json.loads(result))
