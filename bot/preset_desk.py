"""The Studio's preset and settings methods: save, delete, list, set the default, and layer /imagine's options.

A mixin of `Studio` (it provides `store` and `context()`); transport-free like the rest of it. Every
change checks Manage Server here, whatever Discord's integration settings say.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from bot.errors import RequestInvalid
from bot.presets import (Preset, PresetRecord, check_name, layered, missing_files, require_manage_server,
                         validate_preset)
from bot.request import RequestContext, parse_request
from bot.store import Store
from bot.tickets import Requester
from prompts.styles import Style, load_styles

__all__ = ["PresetDesk", "USER_KEYS"]

# What /settings keeps per user (the /imagine options among them are layered under the preset's).
USER_KEYS = ("preset", "width", "height", "steps", "negative", "private")
DEFAULT_KEY = "default_preset"


class PresetDesk:
    """Server presets and per-user defaults, for `Studio`."""

    store: Store
    _styles: dict[str, Style] | None = None

    async def context(self) -> RequestContext:
        raise NotImplementedError

    @property
    def styles(self) -> dict[str, Style]:
        """The styles of prompts/styles.toml (read once)."""
        if self._styles is None:
            self._styles = load_styles()
        return self._styles

    # -- changes (Manage Server) -------------------------------------------------------------

    async def create_preset(self, who: Requester, preset: Preset) -> PresetRecord:
        """Check and store a new server preset."""
        require_manage_server(who, "/preset create")
        guild, name = str(who.guild_id), check_name(preset.name)
        if await self.store.preset(guild, name) is not None:
            raise RequestInvalid(f"preset {name!r} already exists; change it with /preset update {name} or pick "
                                 "another name")
        context = await self.context()
        checked = validate_preset(preset.model_copy(update={"name": name}), context, context.vaes, self.styles)
        return await self.store.add_preset(guild, checked, who.user_id)

    async def update_preset(self, who: Requester, preset: Preset) -> PresetRecord:
        """Change the options given (the others stay), checked again as a whole."""
        require_manage_server(who, "/preset update")
        guild, name = str(who.guild_id), check_name(preset.name)
        existing = await self._record(guild, name)
        merged = Preset(name=name, **{**existing.preset.options(), **preset.options()})
        context = await self.context()
        checked = validate_preset(merged, context, context.vaes, self.styles)
        return await self.store.replace_preset(guild, checked, who.user_id)

    async def delete_preset(self, who: Requester, name: str) -> None:
        """Delete a server preset (and clear it as the default if it was)."""
        require_manage_server(who, "/preset delete")
        guild = str(who.guild_id)
        record = await self._record(guild, name.strip().lower())
        await self.store.remove_preset(guild, record.preset.name)
        if await self.store.get_setting("guild", guild, DEFAULT_KEY) == record.preset.name:
            await self.store.put_setting("guild", guild, DEFAULT_KEY, None)

    async def set_default_preset(self, who: Requester, name: str | None) -> str | None:
        """Make `name` the server's default preset (None: no default); returns it."""
        require_manage_server(who, "/preset default")
        guild = str(who.guild_id)
        chosen = (await self._record(guild, name.strip().lower())).preset.name if name else None
        await self.store.put_setting("guild", guild, DEFAULT_KEY, chosen)
        return chosen

    # -- reads -------------------------------------------------------------------------------

    async def list_presets(self, guild_id: str | None) -> list[PresetRecord]:
        """A server's presets, each with the files it names that are gone (`broken`)."""
        if guild_id is None:
            return []
        context = await self.context()
        return [record.model_copy(update={"broken": tuple(missing_files(record.preset, context, context.vaes))})
                for record in await self.store.presets(guild_id)]

    async def show_preset(self, guild_id: str | None, name: str) -> PresetRecord:
        """One preset with its broken files, or RequestInvalid naming the existing ones."""
        record = await self._record(guild_id, name.strip().lower())
        context = await self.context()
        return record.model_copy(update={"broken": tuple(missing_files(record.preset, context, context.vaes))})

    async def default_preset(self, guild_id: str | None) -> str | None:
        """The server's default preset's name, if one is set."""
        return await self.store.get_setting("guild", guild_id, DEFAULT_KEY) if guild_id else None

    async def preset_names(self, guild_id: str | None, matching: str = "") -> list[str]:
        """Preset names containing `matching` (for autocomplete)."""
        typed = matching.strip().lower()
        records = await self.store.presets(guild_id) if guild_id else []
        return [r.preset.name for r in records if typed in r.preset.name]

    # -- per-user defaults -------------------------------------------------------------------

    async def user_settings(self, who: Requester) -> dict[str, Any]:
        """What `who` keeps as their defaults (/settings)."""
        return dict(await self.store.get_setting("user", who.user_id, "defaults") or {})

    async def change_settings(self, who: Requester, changes: dict[str, Any]) -> dict[str, Any]:
        """Set (or with None, clear) some of `who`'s defaults; returns them all."""
        unknown = sorted(set(changes) - set(USER_KEYS))
        if unknown:
            raise RequestInvalid(f"/settings has no {', '.join(unknown)}; it keeps {', '.join(USER_KEYS)}")
        if changes.get("preset"):  # it must exist here now (it may break later: /imagine then says so)
            changes = {**changes, "preset": (await self._record(who.guild_id, str(changes["preset"]).strip().lower()))
                       .preset.name}
        if changes.get("private") is not None:  # the console gives text: yes/no, true/false, on/off, 1/0
            try:
                changes = {**changes, "private": TypeAdapter(bool).validate_python(changes["private"])}
            except ValidationError:
                raise RequestInvalid(f"private: takes true or false, not {changes['private']!r}") from None
        for key in ("width", "height", "steps"):
            if changes.get(key) is not None:
                request_check = {"prompt": "settings check", key: changes[key]}
                parse_request(request_check, await self.context())
        current = {**await self.user_settings(who), **changes}
        current = {key: value for key, value in current.items() if value is not None}
        await self.store.put_setting("user", who.user_id, "defaults", current)
        return current

    # -- /imagine ----------------------------------------------------------------------------

    async def layered_options(self, explicit: dict[str, Any], who: Requester) -> dict[str, Any]:
        """/imagine's options with the defaults under them, later winning: the server's default preset,
        the user's settings, the chosen preset (`preset:`, else the user's own), the explicit options.

        A chosen preset naming a file that is gone fails here, naming the preset and the file; a broken server
        default is left out, with a note that the result card shows.
        """
        context = await self.context()
        mine = await self.user_settings(who)
        user = {key: value for key, value in mine.items() if key != "preset"}
        chosen = explicit.get("preset") or mine.get("preset")
        default = await self.default_preset(who.guild_id)
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
        record = await self._record(guild_id, name.strip().lower())
        gone = missing_files(record.preset, context, context.vaes)
        if gone:
            raise RequestInvalid(f"{what} {record.preset.name!r} is broken: {', '.join(gone)} is no longer in the "
                                 f"models folder; ask a server manager to /preset update {record.preset.name} with "
                                 f"another file or /preset delete it, or run /imagine without it")
        return record.preset.options()

    async def _record(self, guild_id: str | None, name: str) -> PresetRecord:
        record = await self.store.preset(guild_id, name) if guild_id else None
        if record is None:
            names = [r.preset.name for r in await self.store.presets(guild_id)] if guild_id else []
            raise RequestInvalid(f"there is no preset {name!r} in this server; presets here: "
                                 f"{', '.join(names) or 'none yet'} (a server manager makes them with /preset create)")
        return record
