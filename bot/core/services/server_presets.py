"""A server's named presets: create, update, delete, list, set the default, and layer /imagine's options over them.

Every change checks Manage Server here, whatever Discord's integration settings say.
"""

from __future__ import annotations

from typing import Any

from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from bot.core.presets import (Preset, PresetRecord, check_name, layered, missing_files, require_manage_server,
                              validate_preset)
from bot.core.requests.imagine import RequestContext
from bot.core.services.models import ModelChoices
from bot.core.services.preset_lookup import preset_record
from bot.core.services.server_locks import ServerLocks
from bot.core.services.user_settings import UserDefaults
from bot.core.storage.store import Store
from prompts.styles import Style, load_styles

__all__ = ["ServerPresets"]

DEFAULT_KEY = "default_preset"


class ServerPresets:
    """Server presets in the store, checked against the models folder; /imagine's options layered over them."""

    def __init__(self, store: Store, models: ModelChoices, user_defaults: UserDefaults) -> None:
        self.store, self.models, self.user_defaults = store, models, user_defaults
        self._styles: dict[str, Style] | None = None
        self._changing = ServerLocks()  # create, update, delete, default: one at a time per server

    @property
    def styles(self) -> dict[str, Style]:
        """The styles of prompts/styles.toml (read once)."""
        if self._styles is None:
            self._styles = load_styles()
        return self._styles

    # -- changes (Manage Server) -------------------------------------------------------------

    async def create(self, who: Requester, preset: Preset) -> PresetRecord:
        """Check and store a new server preset."""
        require_manage_server(who, "/preset create")
        guild, name = str(who.guild_id), check_name(preset.name)
        async with self._changing(guild):
            if await self.store.preset(guild, name) is not None:
                raise RequestInvalid(f"preset {name!r} already exists; change it with /preset update {name} or "
                                     "pick another name")
            context = await self.models.context()
            checked = validate_preset(preset.model_copy(update={"name": name}), context, self.styles)
            return await self.store.add_preset(guild, checked, who.user_id)

    async def update(self, who: Requester, preset: Preset) -> PresetRecord:
        """Change the options given (the others stay), checked again as a whole."""
        require_manage_server(who, "/preset update")
        guild, name = str(who.guild_id), check_name(preset.name)
        async with self._changing(guild):  # a delete between the read and the write would lose the row
            existing = await preset_record(self.store, guild, name)
            merged = Preset(name=name, **{**existing.preset.options(), **preset.options()})
            context = await self.models.context()
            checked = validate_preset(merged, context, self.styles)
            return await self.store.replace_preset(guild, checked, who.user_id)

    async def delete(self, who: Requester, name: str) -> None:
        """Delete a server preset (and clear it as the default if it was)."""
        require_manage_server(who, "/preset delete")
        guild = str(who.guild_id)
        async with self._changing(guild):
            record = await preset_record(self.store, guild, name.strip().lower())
            await self.store.remove_preset(guild, record.preset.name)
            if await self.store.get_setting("guild", guild, DEFAULT_KEY) == record.preset.name:
                await self.store.put_setting("guild", guild, DEFAULT_KEY, None)

    async def set_default(self, who: Requester, name: str | None) -> str | None:
        """Make `name` the server's default preset (None: no default); returns it."""
        require_manage_server(who, "/preset default")
        guild = str(who.guild_id)
        async with self._changing(guild):  # a default set to a preset being deleted would outlive it
            chosen = (await preset_record(self.store, guild, name.strip().lower())).preset.name if name else None
            await self.store.put_setting("guild", guild, DEFAULT_KEY, chosen)
        return chosen

    # -- reads -------------------------------------------------------------------------------

    async def of_server(self, guild_id: str | None) -> list[PresetRecord]:
        """A server's presets, each with the files it names that are gone (`broken`)."""
        if guild_id is None:
            return []
        context = await self.models.context()
        return [record.model_copy(update={"broken": tuple(missing_files(record.preset, context))})
                for record in await self.store.presets(guild_id)]

    async def show(self, guild_id: str | None, name: str) -> PresetRecord:
        """One preset with its broken files, or RequestInvalid naming the existing ones."""
        record = await preset_record(self.store, guild_id, name.strip().lower())
        context = await self.models.context()
        return record.model_copy(update={"broken": tuple(missing_files(record.preset, context))})

    async def default(self, guild_id: str | None) -> str | None:
        """The server's default preset's name, if one is set."""
        return await self.store.get_setting("guild", guild_id, DEFAULT_KEY) if guild_id else None

    async def names(self, guild_id: str | None, matching: str = "") -> list[str]:
        """Preset names containing `matching` (for autocomplete)."""
        typed = matching.strip().lower()
        records = await self.store.presets(guild_id) if guild_id else []
        return [r.preset.name for r in records if typed in r.preset.name]

    # -- /imagine ----------------------------------------------------------------------------

    async def layered_options(self, explicit: dict[str, Any], who: Requester,
                              context: RequestContext | None = None) -> dict[str, Any]:
        """/imagine's options with the defaults under them, later winning: the server's default preset,
        the user's settings, the chosen preset (`preset:`, else the user's own), the explicit options.

        A chosen preset naming a file that is gone fails here, naming the preset and the file; a broken server
        default is left out, with a note that the result card shows.
        """
        context = context or await self.models.context()
        mine = await self.user_defaults.get(who)
        user = {key: value for key, value in mine.items() if key != "preset"}
        chosen = explicit.get("preset") or mine.get("preset")
        default = await self.default(who.guild_id)
        if chosen and who.guild_id is None:
            raise RequestInvalid(f"preset {chosen!r}: presets belong to a server; use /imagine there, or leave "
                                 "preset out here")
        base: dict[str, Any] = {}
        notes: list[str] = []
        if default:
            try:
                base = await self._preset_options(who.guild_id, default, context, "the server's default preset")
            except RequestInvalid as err:
                # One broken default must not stop every /imagine in the server: run without it, and say so on
                # the result. A preset someone chose (here or in /settings) still fails: they asked for it.
                notes.append(f"{err}; this image was made without it")
                default = None
        picked = await self._preset_options(who.guild_id, chosen, context, "preset") if chosen else {}
        merged = layered(base, user, picked, {k: v for k, v in explicit.items() if k != "preset"})
        if notes:
            merged["notes"] = tuple(notes)
        if explicit.get("image") is not None:  # img2img keeps the image's size: a default size does not apply
            for key in ("width", "height"):
                if explicit.get(key) is None:
                    merged.pop(key, None)
        if chosen or default:
            merged["preset"] = check_name(str(chosen or default))
        return merged

    async def _preset_options(self, guild_id: str | None, name: str, context: RequestContext,
                              what: str) -> dict[str, Any]:
        record = await preset_record(self.store, guild_id, name.strip().lower())
        gone = missing_files(record.preset, context)
        if gone:
            raise RequestInvalid(f"{what} {record.preset.name!r} is broken: {', '.join(gone)} is no longer in the "
                                 f"models folder; ask a server manager to /preset update {record.preset.name} with "
                                 f"another file or /preset delete it, or run /imagine without it")
        return record.preset.options()
