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
    """Per-member defaults in the store; a named preset must exist in the member's server when it is set."""

    def __init__(self, store: Store, models: ModelChoices) -> None:
        self.store, self.models = store, models

    async def get(self, who: Requester) -> dict[str, Any]:
        """What `who` keeps as their defaults (/settings)."""
        return dict(await self.store.get_setting("user", who.user_id, "defaults") or {})

    async def change(self, who: Requester, changes: dict[str, Any]) -> dict[str, Any]:
        """Set (or with None, clear) some of `who`'s defaults; returns them all."""
        unknown = sorted(set(changes) - set(USER_KEYS))
        if unknown:
            raise RequestInvalid(f"/settings has no {', '.join(unknown)}; it keeps {', '.join(USER_KEYS)}")
        if changes.get("preset"):  # it must exist here now (it may break later: /imagine then says so)
            changes = {**changes, "preset": (await preset_record(self.store, who.guild_id,
                                                                 str(changes["preset"]).strip().lower())).preset.name}
        if changes.get("private") is not None:  # the console gives text: yes/no, true/false, on/off, 1/0
            try:
                changes = {**changes, "private": TypeAdapter(bool).validate_python(changes["private"])}
            except ValidationError:
                raise RequestInvalid(f"private: takes true or false, not {changes['private']!r}") from None
        checks = {key: changes[key] for key in ("width", "height", "steps") if changes.get(key) is not None}
        if checks:
            parse_request({"prompt": "settings check", **checks}, await self.models.context())
        current = {**await self.get(who), **changes}
        current = {key: value for key, value in current.items() if value is not None}
        await self.store.put_setting("user", who.user_id, "defaults", current)
        return current
