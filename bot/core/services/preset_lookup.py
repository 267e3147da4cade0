"""Finding a server's preset by name, for the services that take one (presets, /settings, /imagine's layering)."""

from __future__ import annotations

from bot.core.errors import RequestInvalid
from bot.core.presets import PresetRecord
from bot.core.storage.store import Store

__all__ = ["preset_record"]


async def preset_record(store: Store, guild_id: str | None, name: str) -> PresetRecord:
    """The preset `name` of the server, or RequestInvalid naming the ones it has."""
    record = await store.preset(guild_id, name) if guild_id else None
    if record is None:
        names = [r.preset.name for r in await store.presets(guild_id)] if guild_id else []
        raise RequestInvalid(f"there is no preset {name!r} in this server; presets here: "
                             f"{', '.join(names) or 'none yet'} (a server manager makes them with /preset create)")
    return record
