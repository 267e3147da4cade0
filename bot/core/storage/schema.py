"""The bot's tables in its SQLite file: the migrations that make them, and how they are applied.

The schema version is `PRAGMA user_version`; each migration moves it up by one, in one transaction with its
script, so a file is always at a version this list names. A file from a newer Noodle is refused, not guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from bot.core.storage.preset_table import PRESET_MIGRATION
from bot.core.storage.safety_table import SAFETY_MIGRATION
from engine.errors import NoodleError

__all__ = ["MIGRATIONS", "StoreError", "migrate", "user_version"]


class StoreError(NoodleError):
    """The database file cannot be used as it is (a newer schema, a file that is not SQLite)."""


# Each entry moves `PRAGMA user_version` from its index to index + 1; never edit a shipped one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,                 -- imagine | reroll | variation
        parent_id INTEGER REFERENCES generations(id),
        front TEXT NOT NULL,                -- discord | console: who posts the result
        state TEXT NOT NULL,                -- submitting | queued | running | done | failed | cancelled | deleted
        requester_id TEXT NOT NULL,
        guild_id TEXT,
        channel_id TEXT,
        message_id TEXT,
        request_json TEXT NOT NULL,         -- the options as the person gave them
        params_json TEXT NOT NULL,          -- WorkflowParams of image 1, after defaults, wildcards, LoRA tags
        model_name TEXT NOT NULL,
        model_hash TEXT,
        tokens_json TEXT,                   -- token usage per text encode (node id -> report)
        cached_json TEXT,                   -- nodes every image took from the cache
        timings_json TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        posted_at REAL,
        deleted_at REAL
    );
    CREATE TABLE generation_jobs (
        generation_id INTEGER NOT NULL REFERENCES generations(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,               -- the image's place in the message, from 1
        job_id TEXT UNIQUE,
        seed INTEGER NOT NULL,
        workflow_json TEXT NOT NULL,        -- the ComfyUI API workflow that makes this image
        state TEXT NOT NULL,                -- submitting | queued | running | done | failed | cancelled
        result_json TEXT,                   -- the engine's RunResult: outputs and meta
        image_path TEXT,
        error TEXT,
        started_at REAL,
        finished_at REAL,
        PRIMARY KEY (generation_id, idx)
    );
    CREATE INDEX generations_by_message ON generations(message_id);
    CREATE INDEX generations_by_requester ON generations(requester_id, created_at);
    CREATE INDEX generations_by_state ON generations(state, front);
    -- for presets and per-server defaults (later issues); '' is "no guild" so UNIQUE holds in DMs
    CREATE TABLE presets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id TEXT NOT NULL DEFAULT '',
        owner_id TEXT NOT NULL,
        name TEXT NOT NULL,
        options_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (guild_id, owner_id, name)
    );
    CREATE TABLE settings (
        scope TEXT NOT NULL,                -- guild | user | channel | bot
        scope_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value_json TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (scope, scope_id, key)
    );
    """,
    PRESET_MIGRATION,
    # 3: every PNG of a job, as a JSON list (a /workflow job may write several); image_path stays the first.
    # Older rows keep NULL here and are read through image_path.
    "ALTER TABLE generation_jobs ADD COLUMN image_paths_json TEXT;",
    SAFETY_MIGRATION,  # 4: NSFW scores and what the rules did, blocked members, refused requests (safety_table.py)
)


async def user_version(db: aiosqlite.Connection) -> int:
    """The file's bot schema version: the migrations applied to it."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(db: aiosqlite.Connection, path: Path, migrations: Sequence[str] = MIGRATIONS) -> int:
    """Apply the migrations after the file's `user_version`, each in one transaction; return the new version."""
    version = await user_version(db)
    if version > len(migrations):
        raise StoreError(f"{path} has schema version {version} but this Noodle knows up to {len(migrations)}: "
                         "it was written by a newer Noodle; upgrade Noodle or use another [bot] database file")
    for target, script in enumerate(migrations[version:], start=version + 1):
        # executescript commits first; BEGIN..COMMIT makes the migration and its version bump one step. IMMEDIATE:
        # a second process opening the file at the same time waits for this one's write lock, then finds the step
        # applied (its script fails on what is there now, and the version says why)
        try:
            async with db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"):
                pass
        except sqlite3.OperationalError:
            if db.in_transaction:
                await db.rollback()
            if await user_version(db) >= target:
                continue  # another process applied it meanwhile
            raise
    return len(migrations)
