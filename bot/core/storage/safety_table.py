"""The moderation tables of the bot's SQLite file: what the classifier said of each result and what the rules did
with it, the members a server blocked, and the requests the rules refused.

A mixin of `Store` (one connection, one write lock). A server's rules are one row of `settings` (scope `guild`,
key `rules`); a request made outside any server has guild `''` here, as in the presets table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from bot.core.storage.records import Generation

__all__ = ["SAFETY_MIGRATION", "BlockRecord", "Refusal", "SafetyTable"]

# Migration 4: a result's NSFW scores (one per image) and what the server's rules did with it; blocked members;
# refused requests.
SAFETY_MIGRATION = """
    ALTER TABLE generations ADD COLUMN nsfw_scores_json TEXT;  -- open_nsfw's score of each image, in order
    ALTER TABLE generations ADD COLUMN nsfw_score REAL;        -- the highest of them
    ALTER TABLE generations ADD COLUMN safety TEXT;            -- allow | spoiler | block: what the rules did
    CREATE TABLE member_blocks (
        guild_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        blocked_by TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        blocked_at REAL NOT NULL,
        PRIMARY KEY (guild_id, user_id)
    );
    CREATE TABLE refusals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        guild_id TEXT NOT NULL DEFAULT '',
        user_id TEXT NOT NULL,
        door TEXT NOT NULL,                 -- imagine | reroll | variation | upscale | outpaint | remix | workflow | ...
        reason TEXT NOT NULL,
        text TEXT NOT NULL DEFAULT '',      -- the prompt it was about, cut to 300 characters
        at REAL NOT NULL
    );
    CREATE INDEX refusals_by_member ON refusals(guild_id, user_id, at);
    CREATE INDEX generations_by_guild_member ON generations(guild_id, requester_id, created_at);
"""


@dataclass(frozen=True)
class BlockRecord:
    """A member a server blocked: who did it, why, when."""

    guild_id: str
    user_id: str
    blocked_by: str
    reason: str
    blocked_at: float


@dataclass(frozen=True)
class Refusal:
    """A request the rules refused before it was queued."""

    guild_id: str
    user_id: str
    door: str
    reason: str
    text: str
    at: float


class SafetyTable:
    """Reads and writes of the moderation tables; `Store` provides the connection and the transactions."""

    _db: aiosqlite.Connection

    async def _transaction(self, *statements: tuple[str, Sequence[Any]]) -> int:
        raise NotImplementedError

    async def _many(self, where: str, args: Sequence[Any]) -> list[Generation]:
        raise NotImplementedError

    async def record_review(self, generation_id: int, scores: Sequence[float], action: str) -> None:
        """The classifier's scores of a result's images and what the rules did with it (once: a repost keeps it)."""
        await self._transaction((
            "UPDATE generations SET nsfw_scores_json = ?, nsfw_score = ?, safety = ? WHERE id = ? AND safety IS NULL",
            (json.dumps([round(score, 4) for score in scores]), max(scores, default=None), action, generation_id)))

    async def block_member(self, guild_id: str, user_id: str, by: str, reason: str) -> None:
        """Block `user_id` in `guild_id` (again: the newer reason and moderator replace the older)."""
        await self._transaction((
            "INSERT INTO member_blocks (guild_id, user_id, blocked_by, reason, blocked_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (guild_id, user_id) DO UPDATE SET blocked_by = excluded.blocked_by, "
            "reason = excluded.reason, blocked_at = excluded.blocked_at", (guild_id, user_id, by, reason, time.time())))

    async def unblock_member(self, guild_id: str, user_id: str) -> bool:
        """Lift a block; False when the member was not blocked."""
        return bool(await self._transaction((
            "DELETE FROM member_blocks WHERE guild_id = ? AND user_id = ?", (guild_id, user_id))))

    async def block_of(self, guild_id: str, user_id: str) -> BlockRecord | None:
        """The block on `user_id` in `guild_id`, if any."""
        rows = list(await self._db.execute_fetchall(
            "SELECT * FROM member_blocks WHERE guild_id = ? AND user_id = ?", (guild_id, user_id)))
        return BlockRecord(**dict(rows[0])) if rows else None

    async def blocks(self, guild_id: str) -> list[BlockRecord]:
        """A server's blocked members, the latest first."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM member_blocks WHERE guild_id = ? ORDER BY blocked_at DESC", (guild_id,))
        return [BlockRecord(**dict(row)) for row in rows]

    async def add_refusal(self, guild_id: str, user_id: str, door: str, reason: str, text: str) -> None:
        """Record a refused request (for /mod history)."""
        await self._transaction((
            "INSERT INTO refusals (guild_id, user_id, door, reason, text, at) VALUES (?, ?, ?, ?, ?, ?)",
            (guild_id, user_id, door, reason[:500], text[:300], time.time())))

    async def refusals(self, guild_id: str, user_id: str, limit: int = 10) -> list[Refusal]:
        """A member's latest refused requests in a server, newest first."""
        rows = await self._db.execute_fetchall(
            "SELECT guild_id, user_id, door, reason, text, at FROM refusals WHERE guild_id = ? AND user_id = ? "
            "ORDER BY at DESC, id DESC LIMIT ?", (guild_id, user_id, limit))
        return [Refusal(**dict(row)) for row in rows]

    async def member_generations(self, guild_id: str, user_id: str, limit: int = 10, *,
                                 with_no_server: bool = False) -> list[Generation]:
        """A member's latest requests made in a server (private ones too: moderators see them), newest first;
        `with_no_server` adds those that name no server (the console's, whose server is implied)."""
        where = "(guild_id = ? OR guild_id IS NULL)" if with_no_server else "guild_id = ?"
        return await self._many(f"WHERE {where} AND requester_id = ? ORDER BY id DESC LIMIT ?",
                                (guild_id, user_id, limit))
