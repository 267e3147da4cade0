"""The `/preset ...`, `/settings ...` and `/queue ...` lines of `noodle chat`: the same Studio calls as the Discord
commands, answered as text.

`/preset create name: anime model: tiny-sd15 steps: 28` (Discord's `name: value` notation); the
console is one server of its own (`CONSOLE_SERVER`), and `noodle chat --manage-server` makes the
person at it a member with Manage Server.
"""

from __future__ import annotations

from typing import Any

from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from bot.core.presets import PRESET_OPTIONS, preset_details, preset_from_options, preset_line
from bot.core.requests.options import parse_options
from bot.core.services.moderation import MOD_SUBCOMMANDS, RULE_OPTIONS
from bot.core.services.queue import queue_text
from bot.core.services.user_settings import USER_KEYS, settings_text

__all__ = ["CONSOLE_SERVER", "mod_command", "preset_command", "queue_command", "rules_command", "settings_command"]

CONSOLE_SERVER = "console"
SUBCOMMANDS = ("create", "update", "delete", "default", "list", "show")


async def preset_command(studio: Any, who: Requester, rest: str) -> str:
    """Run `/preset SUB options` for `who`; returns the text to print (errors raise NoodleError)."""
    sub, _, text = rest.strip().partition(" ")
    if sub not in SUBCOMMANDS:
        raise RequestInvalid(f"/preset {sub or '(nothing)'} is not a preset command; use one of "
                             f"{', '.join(SUBCOMMANDS)}, e.g. /preset list")
    options: dict[str, Any] = parse_options(text, PRESET_OPTIONS, first="name")
    if sub in ("create", "update"):
        preset = preset_from_options(options)
        if sub == "create":
            record = await studio.presets.create(who, preset)
            return f"saved preset {preset_line(record)}; use it with /imagine ... preset: {record.preset.name}"
        return f"updated preset {preset_line(await studio.presets.update(who, preset))}"
    name = options.get("name")
    extra = sorted(set(options) - {"name"})
    if extra:
        raise RequestInvalid(f"/preset {sub} takes only name:, not {', '.join(extra)}")
    if sub == "default":
        chosen = await studio.presets.set_default(who, name)
        return f"default preset: {chosen}" if chosen else "no default preset now"
    if sub == "list":
        records = await studio.presets.of_server(who.guild_id)
        default = await studio.presets.default(who.guild_id)
        return "\n".join(preset_line(r, default) for r in records) or "no presets yet; make one with /preset create"
    if not name:
        raise RequestInvalid(f"/preset {sub} needs a name, e.g. /preset {sub} name: anime")
    if sub == "delete":
        await studio.presets.delete(who, name)
        return f"deleted preset {name}"
    record = await studio.presets.show(who.guild_id, name)
    return preset_details(record, await studio.presets.default(who.guild_id))


async def settings_command(studio: Any, who: Requester, rest: str) -> str:
    """`/settings [clear] [preset: P] [width: W] [height: H] [steps: N] [negative: TEXT]`: show or change them."""
    text = rest.strip()
    if text == "clear" or text.startswith("clear "):
        await studio.user_defaults.change(who, dict.fromkeys(await studio.user_defaults.get(who)))
        text = text.removeprefix("clear").strip()
    options = parse_options(text, USER_KEYS, first="preset")
    return settings_text(await studio.user_defaults.change(who, options))


async def queue_command(studio: Any, who: Requester, rest: str) -> str:
    """`/queue [cancel: 12]`: cancel that request first if asked, then list the caller's queue and the engine's
    workers (what each holds and runs)."""
    text = rest.replace("#", "").strip()
    head = ""
    if text:
        number = text.removeprefix("cancel").lstrip(": ").strip()
        # isdecimal: isdigit takes '²', which int() refuses; past 30 digits no request exists and int() refuses 4,300+
        if not text.startswith("cancel") or not number.isdecimal() or len(number) > 30:
            raise RequestInvalid("/queue takes only cancel: NUMBER, as in /queue cancel: 12, "
                                 f"not {rest.strip()[:60]!r}")
        stopped = await studio.queue.cancel(who, int(number))
        head = f"cancelled #{number} ({stopped} image(s) stopped)\n"
    return f"{head}{queue_text(await studio.queue.entries(who))}\n\n{await studio.workers.text(who)}"


async def rules_command(studio: Any, who: Requester, rest: str) -> str:
    """`/rules [ban: w1, w2] [normal: spoiler] [threshold: 0.7] ...`: show or change the console server's rules."""
    options: dict[str, Any] = parse_options(rest.strip(), RULE_OPTIONS, first="(text before an option)")
    if "(text before an option)" in options:
        raise RequestInvalid(f"/rules takes name: value options ({', '.join(RULE_OPTIONS)}), e.g. /rules ban: gore; "
                             f"not {options['(text before an option)'][:40]!r}")
    return await studio.moderation.rules(who, options)


async def mod_command(studio: Any, who: Requester, rest: str) -> str:
    """`/mod history|block|unblock user: ID [reason: ...]`, `/mod blocked`."""
    sub, _, text = rest.strip().partition(" ")
    if sub not in MOD_SUBCOMMANDS:
        raise RequestInvalid(f"/mod {sub or '(nothing)'} is not a moderation command; use one of "
                             f"{', '.join(MOD_SUBCOMMANDS)}, e.g. /mod history user: console:you")
    options = parse_options(text, ("user", "reason"), first="user")
    if sub == "blocked":
        return await studio.moderation.blocked(who)
    user = options.get("user", "").strip().removeprefix("<@").removesuffix(">")
    if not user:
        raise RequestInvalid(f"/mod {sub} needs a member, e.g. /mod {sub} user: console:you")
    if sub == "history":
        return await studio.moderation.history(who, user)
    if sub == "block":
        return await studio.moderation.block(who, user, options.get("reason", ""))
    return await studio.moderation.unblock(who, user)
