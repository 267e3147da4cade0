"""The presets table of the bot's SQLite file: server presets with who made and changed them, and when.

A mixin of `Store` (one connection, one write lock). Server presets have `owner_id = ''` (they belong
to the server, `guild_id`); `created_by`/`updated_by` are the members who made and last changed one.
A server's default preset is a row of `settings` (scope `guild`, key `default_preset`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import aiosqlite

from bot.core.presets import Preset, PresetRecord

__all__ = ["PRESET_MIGRATION", "PresetTable"]

# Migration 2: who last changed a preset and when (migration 1 created the table with its maker only).
PRESET_MIGRATION = """
    ALTER TABLE presets ADD COLUMN created_by TEXT;
    ALTER TABLE presets ADD COLUMN updated_by TEXT;
    ALTER TABLE presets ADD COLUMN updated_at REAL;
"""
SERVER = ""  # owner_id of a server preset


class PresetTable:
    """Reads and writes of the presets table; `Store` provides the connection and the transactions."""

    _db: aiosqlite.Connection

    async def _transaction(self, *statements: tuple[str, Sequence[Any]]) -> int:
        raise NotImplementedError

    async def add_preset(self, guild_id: str, preset: Preset, who: str) -> PresetRecord:
        """Store a new server preset (`ServerPresets.create` refuses a name already taken first)."""
        now = time.time()
        await self._transaction((
            "INSERT INTO presets (guild_id, owner_id, name, options_json, created_at, created_by, updated_by, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (guild_id, SERVER, preset.name, json.dumps(preset.options()), now, who, who, now)))
        found = await self.preset(guild_id, preset.name)
        assert found is not None
        return found

    async def replace_preset(self, guild_id: str, preset: Preset, who: str) -> PresetRecord:
        """Change a stored preset's options (its maker and creation time stay)."""
        await self._transaction((
            "UPDATE presets SET options_json = ?, updated_by = ?, updated_at = ? "
            "WHERE guild_id = ? AND owner_id = ? AND name = ?",
            (json.dumps(preset.options()), who, time.time(), guild_id, SERVER, preset.name)))
        found = await self.preset(guild_id, preset.name)
        assert found is not None
        return found

    async def remove_preset(self, guild_id: str, name: str) -> bool:
        """Delete a server preset; False when there was none of that name."""
        return bool(await self._transaction((
            "DELETE FROM presets WHERE guild_id = ? AND owner_id = ? AND name = ?", (guild_id, SERVER, name))))

    async def preset(self, guild_id: str, name: str) -> PresetRecord | None:
        """One server preset by name."""
        rows = list(await self._db.execute_fetchall(
            "SELECT * FROM presets WHERE guild_id = ? AND owner_id = ? AND name = ?", (guild_id, SERVER, name)))
        return _record(rows[0]) if rows else None

    async def presets(self, guild_id: str) -> list[PresetRecord]:
        """A server's presets by name."""
        rows = await self._db.execute_fetchall(
            "SELECT * FROM presets WHERE guild_id = ? AND owner_id = ? ORDER BY name", (guild_id, SERVER))
        return [_record(row) for row in rows]


def _record(row: aiosqlite.Row) -> PresetRecord:
    created_by = row["created_by"] or row["owner_id"]
    return PresetRecord(preset=Preset(name=row["name"], **json.loads(row["options_json"])), guild_id=row["guild_id"],
                        created_by=created_by, created_at=row["created_at"], updated_by=row["updated_by"] or created_by,
                        updated_at=row["updated_at"] or row["created_at"])
