"""`ServerRules`: what a server's moderators decided (/rules), stored per server, checked at every door.

- What happens to a result the classifier scores over `threshold`: `allow`, `spoiler` (posted behind Discord's
  spoiler, SPOILER_ file names) or `block` (not posted; its requester is told privately, moderators see it in
  /mod history and the log channel). `normal` is the rule of channels not marked NSFW (and of private results
  asked for there), `nsfw` the rule of Discord's age-restricted channels; `channels` overrides one channel.
- Prompt rules: banned words (whole words, any case, accents and spacing tricks folded: safety/words.py) and
  patterns (regular expressions over the folded text), an enforced negative added to every request, allowed and
  blocked checkpoints and LoRAs (file names or `*` globs; an empty allow list allows all).
- `log_channel`: where blocked results and refused requests are reported.

The defaults come from config.toml's [safety] (bot/settings.py's `SafetySettings`), so a server that never ran /rules gets them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.core.errors import RequestInvalid
from bot.settings import SafetySettings

__all__ = ["ACTIONS", "MAX_LIST", "ImageAction", "ServerRules", "name_allowed"]

ImageAction = Literal["allow", "spoiler", "block"]
ACTIONS: tuple[str, ...] = ("allow", "spoiler", "block")
MAX_LIST = 200  # words, patterns or names in one list: a moderator's list, not a dictionary
MAX_ITEM = 100  # characters of one word, pattern or name
MAX_NEGATIVE = 1000


def _clean_list(values: Sequence[str], what: str) -> tuple[str, ...]:
    cleaned = tuple(dict.fromkeys(value.strip() for value in values if value.strip()))
    if len(cleaned) > MAX_LIST:
        raise ValueError(f"{what}: {len(cleaned)} entries; the limit is {MAX_LIST}")
    for value in cleaned:
        if len(value) > MAX_ITEM:
            raise ValueError(f"{what}: {value[:40]!r}... is {len(value)} characters; the limit is {MAX_ITEM}")
    return cleaned


class ServerRules(BaseModel):
    """One server's rules; every field has the value a server that never ran /rules gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(0.8, ge=0.0, le=1.0)
    normal: ImageAction = "block"
    nsfw: ImageAction = "allow"
    channels: dict[str, ImageAction] = Field(default_factory=dict)  # channel id -> its own rule
    banned_words: tuple[str, ...] = ()
    banned_patterns: tuple[str, ...] = ()
    enforced_negative: str = Field("", max_length=MAX_NEGATIVE)
    checkpoints_allowed: tuple[str, ...] = ()
    checkpoints_blocked: tuple[str, ...] = ()
    loras_allowed: tuple[str, ...] = ()
    loras_blocked: tuple[str, ...] = ()
    log_channel: str | None = None

    @classmethod
    def defaults(cls, settings: SafetySettings) -> ServerRules:
        """The rules of a server that has set none: config.toml's [safety]."""
        return cls(threshold=settings.threshold, normal=settings.normal_channels, nsfw=settings.nsfw_channels)

    @field_validator("banned_words", "checkpoints_allowed", "checkpoints_blocked", "loras_allowed", "loras_blocked")
    @classmethod
    def _lists(cls, values: tuple[str, ...], info: Any) -> tuple[str, ...]:
        return _clean_list(values, info.field_name)

    @field_validator("banned_patterns")
    @classmethod
    def _patterns(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = _clean_list(values, "banned_patterns")
        for pattern in cleaned:
            try:
                regex.compile(pattern, regex.IGNORECASE | regex.V1)
            except regex.error as err:
                raise ValueError(f"banned pattern {pattern!r} is not a regular expression ({err}); write e.g. "
                                 r"nud(e|ity) or \bgore\b") from None
        return cleaned

    @field_validator("channels")
    @classmethod
    def _channels(cls, values: dict[str, ImageAction]) -> dict[str, ImageAction]:
        if len(values) > MAX_LIST:
            raise ValueError(f"channels: {len(values)} channel rules; the limit is {MAX_LIST}")
        return values

    def image_action(self, channel_id: str | None, *, nsfw_channel: bool,
                     parent_id: str | None = None) -> ImageAction:
        """What happens to an over-threshold result posted in `channel_id` (or asked for there, when private): its
        own rule, else the rule of the channel a thread `channel_id` is in (`parent_id`: a member who opens a
        thread stays under the channel's rule), else the rule of normal or NSFW channels."""
        for channel in (channel_id, parent_id):
            if channel is not None and channel in self.channels:
                return self.channels[channel]
        return self.nsfw if nsfw_channel else self.normal

    def checkpoint_allowed(self, name: str) -> bool:
        """Whether members may use checkpoint `name` (a file of models/checkpoints) here."""
        return name_allowed(name, self.checkpoints_allowed, self.checkpoints_blocked)

    def lora_allowed(self, name: str) -> bool:
        """Whether members may use LoRA `name` (a file of models/loras) here."""
        return name_allowed(name, self.loras_allowed, self.loras_blocked)

    def changed(self, changes: Mapping[str, Any]) -> ServerRules:
        """These rules with `changes` (field -> new value) made, checked again; RequestInvalid says what is wrong."""
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise RequestInvalid(f"/rules has no {', '.join(unknown)}; it sets {', '.join(type(self).model_fields)}")
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValueError as err:  # pydantic's ValidationError is one
            lines = [str(item.get("msg", "")).removeprefix("Value error, ") + f" ({'.'.join(map(str, item['loc']))})"
                     for item in getattr(err, "errors", lambda: [])()] or [str(err)]
            raise RequestInvalid("; ".join(lines)) from None


def _stem(name: str) -> str:
    name = name.replace("\\", "/").lower()
    return name.removesuffix(".safetensors")


def name_allowed(name: str, allowed: Sequence[str], blocked: Sequence[str]) -> bool:
    """A model file passes when no blocked entry matches it and, if there is an allow list, one allowed entry does.

    Entries match the file name with or without `.safetensors`, in any case, as a whole or as a `*` glob
    (`anime/*`, `*nsfw*`), and also the file's name without its subfolder. Only `*` is a wildcard: `[` and `?`
    are common in model names (`realistic [v2]`, `[pruned]`) and match themselves, where fnmatch would read
    `[v2]` as "v or 2" and let the file the moderator named through."""
    candidates = {_stem(name), _stem(name.replace("\\", "/").rsplit("/", 1)[-1])}

    def matches(entry: str) -> bool:
        pattern = _stem(entry.strip())
        if "*" not in pattern:
            return pattern in candidates
        literal = "*".join(regex.sub(r"([\[\]?])", r"[\1]", part) for part in pattern.split("*"))
        return any(fnmatch.fnmatchcase(candidate, literal) for candidate in candidates)

    if any(matches(entry) for entry in blocked):
        return False
    return not allowed or any(matches(entry) for entry in allowed)
