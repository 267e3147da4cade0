"""Server presets: named /imagine defaults, checked against the models folder, layered under explicit options.

Transport-free: bot/core/services/server_presets.py and both front ends call these. A preset names a
checkpoint, LoRAs with strengths (`name:model[:clip]`, as /imagine's `loras`), an optional VAE, a style of
`prompts/styles.toml`, a negative prompt and sampling options. It is checked when saved; a file
removed from the models folder afterwards makes it *broken*: /imagine with it names the preset and
the missing file, /preset list marks it, and nothing else is affected.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.front_end import Requester
from bot.core.requests.imagine import RequestContext, parse_request
from bot.core.requests.names import resolve_name
from bot.core.requests.options import parse_loras
from prompts.names import closest_names
from prompts.styles import Style

__all__ = ["LAYER_KEYS", "PRESET_OPTIONS", "Preset", "PresetRecord", "check_name", "layered", "missing_files",
           "preset_details", "preset_from_options", "preset_line", "require_manage_server", "validate_preset"]

# The /imagine options a preset or a user's settings may set (what `layered` merges).
LAYER_KEYS = ("model", "loras", "vae", "style", "negative", "steps", "cfg", "sampler", "scheduler", "width",
              "height", "clip_skip")
PRESET_OPTIONS = ("name", *LAYER_KEYS)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class Preset(BaseModel):
    """A preset's options (None: not set, the next layer down decides)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model: str | None = None
    loras: str | None = None
    vae: str | None = None
    style: str | None = None
    negative: str | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None

    def options(self) -> dict[str, Any]:
        """The options it sets, for `layered`."""
        return {key: value for key, value in self.model_dump(exclude={"name"}).items() if value is not None}

    def describe(self) -> str:
        """One line: `name: key=value, ...`."""
        shown = ", ".join(f"{key}={value}" for key, value in self.options().items())
        return f"{self.name}: {shown or '(no options)'}"


class PresetRecord(BaseModel):
    """A stored preset with who made and last changed it, and when."""

    model_config = ConfigDict(frozen=True)

    preset: Preset
    guild_id: str
    created_by: str
    created_at: float
    updated_by: str
    updated_at: float
    broken: tuple[str, ...] = Field(default=())  # the files it names that are gone


def preset_line(record: PresetRecord, default: str | None = None, *, markdown: bool = False) -> str:
    """A preset as one line: ⭐ for the default, ⚠️ with the missing files when broken, who changed it last.

    `markdown` is Discord's: the preset in bold, the member as a mention; the console prints plain text.
    """
    mark = " ⭐ default" if record.preset.name == default else ""
    broken = f" ⚠️ broken: {', '.join(record.broken)} missing" if record.broken else ""
    shown = f"**{record.preset.describe()}**" if markdown else record.preset.describe()
    return f"{shown}{mark}{broken} (changed by {_member(record.updated_by, markdown)} {_utc(record.updated_at)} UTC)"


def preset_details(record: PresetRecord, default: str | None = None, *, markdown: bool = False) -> str:
    """/preset show: the preset's line, then who made it and when."""
    return (f"{preset_line(record, default, markdown=markdown)}\n"
            f"made by {_member(record.created_by, markdown)} {_utc(record.created_at)} UTC")


def _member(user_id: str, markdown: bool) -> str:
    return f"<@{user_id}>" if markdown else user_id


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


def preset_from_options(options: Mapping[str, Any]) -> Preset:
    """A Preset from typed or console (text) options; RequestInvalid names each option that is wrong."""
    try:
        return Preset.model_validate({key: value for key, value in options.items() if value is not None})
    except ValidationError as err:
        lines = []
        for item in err.errors():
            where = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                lines.append(f"{where} is not an option of a preset; use {', '.join(PRESET_OPTIONS)}")
            elif item["type"] == "missing":
                lines.append(f"{where} is required, e.g. name: anime")
            else:
                lines.append(f"{where} {item['input']!r}: {item['msg'].lower()}")
        raise RequestInvalid("\n".join(lines)) from None


def require_manage_server(who: Requester, action: str) -> None:
    """Refuse `action` unless `who` has Manage Server in this server (checked here, not only by Discord)."""
    if who.guild_id is None:
        raise NotAllowed(f"{action} works in a server only; presets belong to a server: use the command there")
    if not who.manage_server:
        raise NotAllowed(f"{action} needs the Manage Server permission; ask a server manager to do it, or use "
                         "/imagine with your own options (or /preset list to see what exists)")


def check_name(name: str) -> str:
    """A preset name: lower-case letters, digits, '-' and '_', up to 32 characters."""
    cleaned = name.strip().lower()
    if not NAME_RE.match(cleaned):
        raise RequestInvalid(f"preset name {name!r} is not allowed; use 1-32 lower-case letters, digits, '-' or "
                             "'_', starting with a letter or digit (e.g. anime-hq)")
    return cleaned


def validate_preset(preset: Preset, context: RequestContext, styles: Mapping[str, Style]) -> Preset:
    """The preset with its file names resolved, or RequestInvalid/ModelNotFound saying what is wrong.

    Ranges, sampler and scheduler are /imagine's own checks (the same limits from config.toml);
    the checkpoint, LoRAs and VAE must be in the models folder now; the style in styles.toml.
    """
    name = check_name(preset.name)
    options = {key: value for key, value in preset.options().items() if key not in ("vae", "style")}
    request = parse_request({"prompt": "preset check", **options}, context)
    resolved: dict[str, Any] = {"name": name, "model": request.model and resolve_name(
        "checkpoint", request.model, context.checkpoints, "models/checkpoints")}
    if preset.loras:
        specs = parse_loras(preset.loras)
        resolved["loras"] = ", ".join(
            f"{resolve_name('LoRA', s.name, context.loras, 'models/loras')}:{s.strength_model:g}:{s.strength_clip:g}"
            for s in specs)
    if preset.vae:
        resolved["vae"] = resolve_name("VAE", preset.vae, context.vaes, "models/vae")
    if preset.style is not None and preset.style not in styles:
        hint = closest_names(preset.style, styles)
        closest = f"; closest: {', '.join(hint)}" if hint else ""
        raise RequestInvalid(f"style {preset.style!r} is not in prompts/styles.toml{closest}; choose one of "
                             f"{', '.join(styles) or 'none'}")
    return preset.model_copy(update=resolved)


def missing_files(preset: Preset, context: RequestContext) -> list[str]:
    """The files the preset names that are no longer in the models folder (empty: it still works)."""
    gone: list[str] = []
    if preset.model and preset.model not in context.checkpoints:
        gone.append(f"models/checkpoints/{preset.model}")
    for spec in parse_loras(preset.loras):
        if spec.name not in context.loras:
            gone.append(f"models/loras/{spec.name}")
    if preset.vae and preset.vae not in context.vaes:
        gone.append(f"models/vae/{preset.vae}")
    return gone


def layered(server_default: Mapping[str, Any] | None, user_settings: Mapping[str, Any] | None,
            preset: Mapping[str, Any] | None, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Merge /imagine options, later layers winning: server default preset, user settings, chosen preset,
    explicit options. None values never override (they mean "not set")."""
    merged: dict[str, Any] = {}
    for layer in (server_default, user_settings, preset, explicit):
        merged.update({key: value for key, value in (layer or {}).items() if value is not None})
    return merged
