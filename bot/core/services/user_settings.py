"""/settings: what a member keeps as their defaults (a preset, size, steps, negative, private), checked as /imagine
would check them."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from bot.core.requests.imagine import parse_request
from bot.core.services.models import ModelChoices
from bot.core.services.preset_lookup import preset_record
from bot.core.storage.store import Store

__all__ = ["USER_KEYS", "UserDefaults", "settings_text"]

# What /settings keeps per user (the /imagine options among them are layered under the preset's).
USER_KEYS = ("preset", "width", "height", "steps", "negative", "private")


def settings_text(current: dict[str, Any]) -> str:
    """A member's defaults as one line (what /settings answers on Discord and in `noodle chat`)."""
    if not current:
        return "no defaults of your own: /imagine uses the server's default preset and config.toml"
    return "your defaults: " + ", ".join(f"{key}={value}" for key, value in current.items())


class UserDefaults:
    """Per-member defaults in the store. Size, steps, negative and private follow the member everywhere; a preset
    is a server's, so the preset default is kept per server ("preset:<server id>") and must exist there when set.

    Rows written before that kept one "preset" among the rest: it is used only in a server that has a preset of
    that name, and never stops an /imagine elsewhere (which server it was chosen in was not recorded).
    """

    def __init__(self, store: Store, models: ModelChoices) -> None:
        self.store, self.models = store, models

    async def get(self, who: Requester) -> dict[str, Any]:
        """What `who` keeps as their defaults (/settings), with the preset they chose in this server."""
        current = await self._everywhere(who)
        legacy = current.pop("preset", None)
        here = None
        if who.guild_id is not None:
            here = await self.store.get_setting("user", who.user_id, _preset_key(who.guild_id))
            if here is None and legacy and await self.store.preset(who.guild_id, legacy) is not None:
                here = legacy
        return {"preset": here, **current} if here else current

    async def change(self, who: Requester, changes: dict[str, Any]) -> dict[str, Any]:
        """Set (or with None, clear) some of `who`'s defaults; returns them all, as `get` reads them."""
        unknown = sorted(set(changes) - set(USER_KEYS))
        if unknown:
            raise RequestInvalid(f"/settings has no {', '.join(unknown)}; it keeps {', '.join(USER_KEYS)}")
        if "preset" in changes:
            await self._set_preset(who, changes.pop("preset"))
        if changes.get("private") is not None:  # the console gives text: yes/no, true/false, on/off, 1/0
            try:
                changes = {**changes, "private": TypeAdapter(bool).validate_python(changes["private"])}
            except ValidationError:
                raise RequestInvalid(f"private: takes true or false, not {changes['private']!r}") from None
        checks = {key: changes[key] for key in ("width", "height", "steps") if changes.get(key) is not None}
        if checks:
            parse_request({"prompt": "settings check", **checks}, await self.models.context())
        if changes:
            current = {**await self._everywhere(who), **changes}
            await self.store.put_setting("user", who.user_id, "defaults",
                                         {key: value for key, value in current.items() if value is not None})
        return await self.get(who)

    async def _everywhere(self, who: Requester) -> dict[str, Any]:
        return dict(await self.store.get_setting("user", who.user_id, "defaults") or {})

    async def _set_preset(self, who: Requester, name: Any) -> None:
        """Keep `name` (it must exist in this server now; it may break later: /imagine then says so) as `who`'s
        preset here, or with None forget it here ("" is kept: it also stands over a pre-server-row preset)."""
        if who.guild_id is None:
            if name:
                raise RequestInvalid("preset: presets belong to a server; set it with /settings in that server")
            return
        if name:
            name = (await preset_record(self.store, who.guild_id, str(name).strip().lower())).preset.name
        await self.store.put_setting("user", who.user_id, _preset_key(who.guild_id), name or "")


def _preset_key(guild_id: str) -> str:
    return f"preset:{guild_id}"
