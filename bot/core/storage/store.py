"""The bot's SQLite history: every generation with what reproduces it, keyed by job id and message id.

The last stop of the flow (command -> request -> workflow -> queue -> ... -> result -> store). A
generation is one request and one posted message; each of its images is one engine job with its own
seed and workflow (the queue samples compatible jobs as one batch), a row of `generation_jobs`.
One file holds these tables and the engine's job queue, in WAL mode so both write to it; the bot's
schema version is `PRAGMA user_version` (the engine keeps its own in `engine_schema`), and each
migration (schema.py) moves it up by one. A result posted before a restart is found again by its message id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from bot.core.storage.preset_table import PresetTable
from bot.core.storage.records import ENDED, Generation, JobRow, NewGeneration, Outcome
from bot.core.storage.safety_table import SafetyTable
from bot.core.storage.schema import StoreError, migrate, user_version
from engine.disk import DiskFull, is_disk_full

__all__ = ["PENDING", "WRITE_FAILED", "Store"]

# What a refused write raises: SQLite's own errors, and DiskFull for one refused because the disk is full
WRITE_FAILED: tuple[type[BaseException], ...] = (aiosqlite.Error, DiskFull)

PENDING = ("submitting", "queued", "running")
_IN_PENDING = "('submitting', 'queued', 'running')"


@dataclass(frozen=True)
class _Rows:
    generation: aiosqlite.Row
    jobs: list[aiosqlite.Row]


def _loads(text: str | None, empty: Any) -> Any:
    return empty if text is None else json.loads(text)


# KSampler seeds reach 2**64 - 1, SQLite's INTEGER stops at 2**63 - 1: the upper half is kept as its two's
# complement (negative), which no real seed is, so old rows read back unchanged and every seed round-trips
def _seed_to_row(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed


def _seed_from_row(value: int) -> int:
    return value + 2**64 if value < 0 else value


def _job(row: aiosqlite.Row) -> JobRow:
    return JobRow(idx=row["idx"], job_id=row["job_id"], seed=_seed_from_row(row["seed"]),
                  workflow=json.loads(row["workflow_json"]),
                  state=row["state"], result=_loads(row["result_json"], None), image_path=row["image_path"],
                  error=row["error"], started_at=row["started_at"], finished_at=row["finished_at"],
                  image_paths=tuple(_loads(row["image_paths_json"], [])))


def _generation(rows: _Rows) -> Generation:
    data = dict(rows.generation)
    return Generation(
        id=data["id"], kind=data["kind"], parent_id=data["parent_id"], front=data["front"], state=data["state"],
        requester_id=data["requester_id"], guild_id=data["guild_id"], channel_id=data["channel_id"],
        message_id=data["message_id"], request=json.loads(data["request_json"]),
        params=json.loads(data["params_json"]), model_name=data["model_name"], model_hash=data["model_hash"],
        created_at=data["created_at"], jobs=tuple(_job(row) for row in rows.jobs),
        tokens=_loads(data["tokens_json"], {}), cached=_loads(data["cached_json"], []),
        timings=_loads(data["timings_json"], {}), error=data["error"], started_at=data["started_at"],
        finished_at=data["finished_at"], posted_at=data["posted_at"], deleted_at=data["deleted_at"],
        nsfw_scores=tuple(_loads(data["nsfw_scores_json"], [])), safety=data["safety"],
    )


_LOCKED_WAIT_S = 0.05
_LOCKED_TRIES = 200  # 10 s, busy_timeout's own wait


async def _pragma(db: aiosqlite.Connection, pragma: str) -> None:
    """Run one PRAGMA. Switching a new file to WAL while another process opens it at the same moment (the bot and a
    `noodle chat` started together) can answer "database is locked" without waiting for busy_timeout (SQLite does
    not call its busy handler there), so that one answer is waited out, up to the same 10 s."""
    for attempt in range(_LOCKED_TRIES):
        try:
            async with db.execute(pragma):
                return
        except aiosqlite.OperationalError as err:
            if "locked" not in str(err) or attempt == _LOCKED_TRIES - 1:
                raise
            await asyncio.sleep(_LOCKED_WAIT_S)


class Store(PresetTable, SafetyTable):
    """Generations, their jobs and the per-scope settings over one aiosqlite connection (presets: preset_table.py;
    moderation: safety_table.py)."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._writing = asyncio.Lock()  # one transaction at a time on the one connection

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (or create) the database file, switch it to WAL and run the migrations it lacks."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # IMMEDIATE: a write transaction takes the write lock when it begins, waiting (busy_timeout) for the
        # engine's connection; a deferred one would read first and then fail at once with "database is
        # locked" whenever the engine wrote in between (WAL refuses to upgrade a stale snapshot).
        db = await aiosqlite.connect(path, isolation_level="IMMEDIATE")
        try:
            db.row_factory = aiosqlite.Row
            # busy_timeout: the engine's worker writes the same file, so wait for its lock instead of failing at
            # once. Every cursor here is closed as soon as it is read (`async with`): an open one (WAL's answer
            # row, kept alive by whoever holds its future) leaves a statement in progress, and the migration's
            # COMMIT fails with "cannot commit transaction - SQL statements in progress".
            for pragma in ("PRAGMA busy_timeout = 10000", "PRAGMA journal_mode = WAL", "PRAGMA foreign_keys = ON"):
                await _pragma(db, pragma)
            await migrate(db, path)
        except aiosqlite.DatabaseError as err:
            await db.close()
            raise StoreError(f"{path} cannot be used as Noodle's database ({err}); point [bot] database in "
                             "config.toml at a new file or at a Noodle database") from err
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        """Close the connection (its worker thread ends with it)."""
        await self._db.close()

    async def schema_version(self) -> int:
        """The bot's schema version (`PRAGMA user_version`)."""
        return await user_version(self._db)

    # -- a request's life --------------------------------------------------------------------

    async def add(self, new: NewGeneration, *, created_at: float | None = None) -> Generation:
        """Record an accepted request and its images' jobs (state `submitting`) in one transaction."""
        async with self._atomic():
            async with self._db.execute(
                    "INSERT INTO generations (kind, parent_id, front, state, requester_id, guild_id, channel_id, "
                    "request_json, params_json, model_name, created_at) "
                    "VALUES (?, ?, ?, 'submitting', ?, ?, ?, ?, ?, ?, ?)",
                    (new.kind, new.parent_id, new.front, new.requester_id, new.guild_id, new.channel_id,
                     json.dumps(new.request), json.dumps(new.params), new.model_name,
                     time.time() if created_at is None else created_at)) as cursor:
                generation_id = int(cursor.lastrowid or 0)
            async with self._db.executemany(
                    "INSERT INTO generation_jobs (generation_id, idx, seed, workflow_json, state) "
                    "VALUES (?, ?, ?, ?, 'submitting')",
                    [(generation_id, idx, _seed_to_row(seed), json.dumps(workflow))
                     for idx, (seed, workflow) in enumerate(new.images, 1)]):
                pass
        generation = await self.get(generation_id)
        assert generation is not None
        return generation

    async def attach_job(self, generation_id: int, idx: int, job_id: str) -> None:
        """The engine accepted image `idx`'s job."""
        # the job's own events may have got here first (a fast job): never move it back to queued
        await self._write("UPDATE generation_jobs SET job_id = ?, state = CASE WHEN state = 'submitting' THEN 'queued' "
                          "ELSE state END WHERE generation_id = ? AND idx = ?", (job_id, generation_id, idx))

    async def mark_queued(self, generation_id: int) -> None:
        """Every image's job is in the queue."""
        await self._write("UPDATE generations SET state = 'queued' WHERE id = ? AND state = 'submitting'",
                          (generation_id,))

    async def discard(self, generation_id: int) -> None:
        """Forget a request the engine refused (invalid, queue full): bad input changes nothing."""
        await self._write("DELETE FROM generations WHERE id = ? AND state = 'submitting'", (generation_id,))

    async def mark_running(self, job_id: str, started_at: float) -> int | None:
        """The worker started a job; returns its generation id."""
        await self._transaction(
            ("UPDATE generation_jobs SET state = 'running', started_at = COALESCE(started_at, ?) "
             "WHERE job_id = ? AND state IN ('submitting', 'queued')", (started_at, job_id)),
            ("UPDATE generations SET state = 'running', started_at = COALESCE(started_at, ?) WHERE id = "
             f"(SELECT generation_id FROM generation_jobs WHERE job_id = ?) AND state IN {_IN_PENDING}",
             (started_at, job_id)))
        return await self._generation_of(job_id)

    async def end_job(self, job_id: str, state: str, *, result: dict[str, Any] | None = None,
                      error: str | None = None, finished_at: float | None = None) -> int | None:
        """Record a job's end (done with its RunResult, or failed/cancelled and why); returns its generation id."""
        if state not in ENDED:
            raise ValueError(f"end_job() takes done, failed or cancelled, not {state!r}")
        await self._write(
            "UPDATE generation_jobs SET state = ?, result_json = ?, error = ?, finished_at = ? "
            f"WHERE job_id = ? AND state IN {_IN_PENDING}",
            (state, None if result is None else json.dumps(result), error,
             time.time() if finished_at is None else finished_at, job_id))
        return await self._generation_of(job_id)

    async def settle(self, generation_id: int, outcome: Outcome) -> bool:
        """Store the whole generation's outcome once all its jobs ended; False when it was settled already."""
        changed = await self._transaction(
            *[("UPDATE generation_jobs SET image_path = ?, image_paths_json = ? WHERE generation_id = ? AND idx = ?",
               (path, json.dumps(outcome.all_images.get(idx, [path])), generation_id, idx))
              for idx, path in outcome.images.items()],
            ("UPDATE generations SET state = ?, model_hash = COALESCE(?, model_hash), tokens_json = ?, "
             "cached_json = ?, timings_json = ?, error = ?, finished_at = ?, started_at = COALESCE(started_at, ?) "
             f"WHERE id = ? AND state IN {_IN_PENDING}",
             (outcome.state, outcome.model_hash, json.dumps(outcome.tokens), json.dumps(outcome.cached),
              json.dumps(outcome.timings), outcome.error, outcome.finished_at,
              outcome.finished_at - outcome.timings.get("total", 0.0), generation_id)))
        return changed > 0

    async def fail(self, generation_id: int, error: str, finished_at: float) -> bool:
        """Record a request the result collector failed without its outcome (the database could not be written
        then): its jobs still open, or done with images since removed, fail with `error`; False if it was settled."""
        changed = await self._transaction(
            ("UPDATE generation_jobs SET state = 'failed', error = COALESCE(error, ?), result_json = NULL, "
             "image_path = NULL, image_paths_json = NULL, finished_at = COALESCE(finished_at, ?) "
             f"WHERE generation_id = ? AND state IN ('done', {_IN_PENDING[1:-1]}) "
             f"AND (SELECT state FROM generations WHERE id = ?) IN {_IN_PENDING}",
             (error, finished_at, generation_id, generation_id)),
            ("UPDATE generations SET state = 'failed', error = ?, finished_at = ? "
             f"WHERE id = ? AND state IN {_IN_PENDING}", (error, finished_at, generation_id)))
        return changed > 0

    async def mark_posted(self, generation_id: int, message_id: str | None, posted_at: float) -> None:
        """The result is out (a Discord message id; None for the console)."""
        await self._write("UPDATE generations SET message_id = ?, posted_at = ? WHERE id = ?",
                          (message_id, posted_at, generation_id))

    async def mark_deleted(self, generation_id: int, deleted_at: float) -> None:
        """Deleted by its requester or a moderator: the row stays (history), reactions stop working."""
        await self._transaction(
            ("UPDATE generations SET state = 'deleted', deleted_at = ? WHERE id = ?", (deleted_at, generation_id)),
            ("UPDATE generation_jobs SET image_path = NULL, image_paths_json = NULL WHERE generation_id = ?",
             (generation_id,)))

    async def put_setting(self, scope: str, scope_id: str, key: str, value: Any) -> None:
        """Set one value of the settings table (per guild, user or channel; "bot"/"global" for the bot's own)."""
        await self._write("INSERT INTO settings (scope, scope_id, key, value_json, updated_at) VALUES (?, ?, ?, ?, ?) "
                          "ON CONFLICT (scope, scope_id, key) DO UPDATE SET value_json = excluded.value_json, "
                          "updated_at = excluded.updated_at", (scope, scope_id, key, json.dumps(value), time.time()))

    async def get_setting(self, scope: str, scope_id: str, key: str) -> Any:
        """One value of the settings table, or None."""
        rows = await self._db.execute_fetchall(
            "SELECT value_json FROM settings WHERE scope = ? AND scope_id = ? AND key = ?", (scope, scope_id, key))
        return json.loads(list(rows)[0][0]) if rows else None

    # -- reads -------------------------------------------------------------------------------

    async def get(self, generation_id: int) -> Generation | None:
        """A generation with its jobs, by id."""
        found = await self._many("WHERE id = ?", (generation_id,))
        return found[0] if found else None

    async def by_job(self, job_id: str) -> Generation | None:
        """The generation one of whose images is job `job_id`."""
        generation_id = await self._generation_of(job_id)
        return None if generation_id is None else await self.get(generation_id)

    async def by_message(self, message_id: int | str) -> Generation | None:
        """The generation whose result is the message `message_id` (a Discord snowflake)."""
        found = await self._many("WHERE message_id = ?", (str(message_id),))
        return found[0] if found else None

    async def pending(self) -> list[Generation]:
        """Generations not yet settled (for the reconciliation after a restart)."""
        return await self._many(f"WHERE state IN {_IN_PENDING} ORDER BY id", ())

    async def unposted(self, front: str) -> list[Generation]:
        """Settled generations of `front` whose result was never posted (the process stopped in between)."""
        return await self._many("WHERE state = 'done' AND posted_at IS NULL AND front = ? ORDER BY id", (front,))

    async def uses_input(self, name: str, *, besides: int) -> bool:
        """Whether a generation other than #`besides`, and not deleted, loads input `name` (a shared upload)."""
        rows = await self._db.execute_fetchall(
            "SELECT 1 FROM generations g WHERE g.id != ? AND g.state != 'deleted' AND "
            "(json_extract(g.params_json, '$.init_image') = ? OR EXISTS (SELECT 1 FROM generation_jobs j "
            "WHERE j.generation_id = g.id AND instr(j.workflow_json, ?) > 0)) LIMIT 1",
            (besides, name, json.dumps(name)))
        return bool(list(rows))

    async def sent_input(self, requester_id: str, name: str) -> bool:
        """Whether `requester_id` sent input `name`: an /imagine image: or control_image: of theirs, or the result
        they took back for a variation (params, which a member's own text never writes)."""
        rows = await self._db.execute_fetchall(
            "SELECT 1 FROM generations WHERE requester_id = ? AND (json_extract(params_json, '$.init_image') = ? "
            "OR json_extract(params_json, '$.control_image') = ?) LIMIT 1", (requester_id, name, name))
        return bool(list(rows))

    async def finished_before(self, before: float) -> list[Generation]:
        """Done and posted generations that finished before `before` (for retention of results), oldest first; one
        never posted yet (Discord away, a stop between the run's end and the post) waits for its post."""
        return await self._many("WHERE state = 'done' AND finished_at < ? AND posted_at IS NOT NULL ORDER BY id",
                                (before,))

    async def images_kept(self, before: float) -> set[str]:
        """PNG paths of results that are not deleted and finished at or after `before`, or are not posted yet
        (retention keeps them)."""
        rows = await self._db.execute_fetchall(
            "SELECT j.image_path, j.image_paths_json FROM generation_jobs j "
            "JOIN generations g ON g.id = j.generation_id "
            f"WHERE g.state != 'deleted' AND (g.finished_at IS NULL OR g.finished_at >= ? OR g.state IN {_IN_PENDING} "
            "OR g.posted_at IS NULL)",
            (before,))
        return {path for row in rows for path in [row[0], *_loads(row[1], [])] if path}

    async def recent(self, requester_id: str | None = None, limit: int = 20) -> list[Generation]:
        """The latest generations, newest first (of one requester, if given)."""
        if requester_id is None:
            return await self._many("ORDER BY id DESC LIMIT ?", (limit,))
        return await self._many("WHERE requester_id = ? ORDER BY id DESC LIMIT ?", (requester_id, limit))

    async def _generation_of(self, job_id: str) -> int | None:
        rows = list(await self._db.execute_fetchall(
            "SELECT generation_id FROM generation_jobs WHERE job_id = ?", (job_id,)))
        return int(rows[0][0]) if rows else None

    async def _many(self, where: str, args: Sequence[Any]) -> list[Generation]:
        # execute_fetchall: one call on the connection's thread, so no other coroutine's write runs while
        # a half-read SELECT holds an old snapshot (WAL then refuses that write with "database is locked")
        rows = list(await self._db.execute_fetchall(f"SELECT * FROM generations {where}", args))
        if not rows:
            return []
        ids = [row["id"] for row in rows]
        jobs = await self._db.execute_fetchall(
            f"SELECT * FROM generation_jobs WHERE generation_id IN ({', '.join('?' * len(ids))}) "
            "ORDER BY generation_id, idx", ids)
        by_generation: dict[int, list[aiosqlite.Row]] = {}
        for job in jobs:
            by_generation.setdefault(job["generation_id"], []).append(job)
        return [_generation(_Rows(row, by_generation.get(row["id"], []))) for row in rows]

    async def _write(self, sql: str, args: Sequence[Any]) -> int:
        return await self._transaction((sql, args))

    async def _transaction(self, *statements: tuple[str, Sequence[Any]]) -> int:
        """Run statements as one transaction, never interleaved with another coroutine's; rows changed by the last."""
        changed = 0
        async with self._atomic():
            for sql, args in statements:
                async with self._db.execute(sql, args) as cursor:
                    changed = cursor.rowcount
        return changed

    @asynccontextmanager
    async def _atomic(self) -> AsyncIterator[None]:
        """One transaction, never interleaved with another coroutine's: committed at the end, or rolled back
        (a full disk raised as DiskFull, naming the database)."""
        async with self._writing:
            try:
                yield
                await self._db.commit()
            except BaseException as err:
                await self._db.rollback()
                if is_disk_full(err):
                    raise self._full() from err
                raise

    def _full(self) -> DiskFull:
        """A write that failed on a full disk, as a message for the person whose command it was."""
        return DiskFull(f"the disk holding the database ({self.path.name}) is full, so Noodle could not record this; "
                        "nothing was queued or changed: the server owner must free space on it, then try again")
