"""/rules and /mod: a server's moderators set its rules, read a member's history, block and unblock members.

Permissions are checked here, in code, whatever the front end's command schema says: /rules needs Manage Server,
/mod needs Manage Server or Manage Messages (Discord resolves both per server; the console's person has them with
`noodle chat --manage-server`). Both work only in a server: DMs have no moderators.

/rules options (both front ends spell them the same):
  threshold: 0.8              the NSFW score from which a result counts as NSFW (0..1)
  normal: block               what happens to such a result in channels not marked NSFW (allow, spoiler, block)
  nsfw: allow                 ... in channels Discord marks NSFW
  channel: ID  action: X      one channel's own rule (action: default removes it)
  ban: "w1, w2"  unban: "w1"  banned words (whole words; `nud*` for a word's start)
  ban_pattern: RE  unban_pattern: RE
  negative: TEXT              the enforced negative prompt (- clears it)
  allow_checkpoints / block_checkpoints / allow_loras / block_loras: "a, b*"   (- clears the list)
  log_channel: ID             where blocked results and refusals are reported (- turns it off)
  reset: true                 back to config.toml's [safety]
"""

from __future__ import annotations

import time
from typing import Any

from bot.core.cards.card import truncate
from bot.core.cards.result import request_label
from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.front_end import Requester
from bot.core.safety.gate import SafetyGate
from bot.core.safety.rules import ACTIONS, ServerRules
from bot.core.services.server_locks import ServerLocks
from bot.core.storage.store import Store

__all__ = ["MOD_SUBCOMMANDS", "RULE_OPTIONS", "Moderation", "rules_text"]

RULE_OPTIONS = ("threshold", "normal", "nsfw", "channel", "action", "ban", "unban", "ban_pattern", "unban_pattern",
                "negative", "allow_checkpoints", "block_checkpoints", "allow_loras", "block_loras", "log_channel",
                "reset")
MOD_SUBCOMMANDS = ("history", "block", "unblock", "blocked")
_LISTS = {"allow_checkpoints": "checkpoints_allowed", "block_checkpoints": "checkpoints_blocked",
          "allow_loras": "loras_allowed", "block_loras": "loras_blocked"}
CLEAR = "-"


def _items(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _action(value: Any, option: str, *, default_ok: bool = False) -> str:
    word = str(value).strip().lower()
    allowed = (*ACTIONS, "default") if default_ok else ACTIONS
    if word not in allowed:
        raise RequestInvalid(f"{option}: {value!r} is not a rule; use {', '.join(allowed)}")
    return word


def _changes(rules: ServerRules, options: dict[str, Any]) -> dict[str, Any]:
    """/rules options -> the ServerRules fields they change."""
    unknown = sorted(set(options) - set(RULE_OPTIONS))
    if unknown:
        raise RequestInvalid(f"/rules has no {', '.join(unknown)}; its options are {', '.join(RULE_OPTIONS)}")
    changes: dict[str, Any] = {}
    if "threshold" in options:
        try:
            changes["threshold"] = float(options["threshold"])
        except (TypeError, ValueError):
            raise RequestInvalid(f"threshold: {options['threshold']!r} is not a number; give 0 to 1, e.g. 0.8") \
                from None
    for option in ("normal", "nsfw"):
        if option in options:
            changes[option] = _action(options[option], option)
    if ("channel" in options) != ("action" in options):
        raise RequestInvalid("a channel's own rule needs both: channel: ID action: allow|spoiler|block|default")
    if "channel" in options:
        channel = str(options["channel"]).strip().removeprefix("<#").removesuffix(">")
        if not channel.isdecimal():
            raise RequestInvalid(f"channel: {options['channel']!r} is not a channel; pick one, or give its id")
        action = _action(options["action"], "action", default_ok=True)
        channels = dict(rules.channels)
        if action == "default":
            channels.pop(channel, None)
        else:
            channels[channel] = action
        changes["channels"] = channels
    words, patterns = list(rules.banned_words), list(rules.banned_patterns)
    words += _items(options.get("ban", ""))
    patterns += [str(options["ban_pattern"]).strip()] if str(options.get("ban_pattern", "")).strip() else []
    removed = {item.lower() for item in _items(options.get("unban", ""))}
    words = [word for word in words if word.lower() not in removed]
    if "unban_pattern" in options:
        patterns = [pattern for pattern in patterns if pattern != str(options["unban_pattern"]).strip()]
    if words != list(rules.banned_words):
        changes["banned_words"] = tuple(words)
    if patterns != list(rules.banned_patterns):
        changes["banned_patterns"] = tuple(patterns)
    if "negative" in options:
        text = str(options["negative"]).strip()
        changes["enforced_negative"] = "" if text == CLEAR else text
    for option, field in _LISTS.items():
        if option in options:
            text = str(options[option]).strip()
            changes[field] = () if text == CLEAR else tuple(_items(text))
    if "log_channel" in options:
        text = str(options["log_channel"]).strip().removeprefix("<#").removesuffix(">")
        if text != CLEAR and not text.isdecimal():
            raise RequestInvalid(f"log_channel: {options['log_channel']!r} is not a channel; pick one, or - for none")
        changes["log_channel"] = None if text == CLEAR else text
    return changes


def rules_text(rules: ServerRules) -> str:
    """A server's rules as moderators read them."""
    lines = [f"NSFW threshold: {rules.threshold:.2f} (open_nsfw score, 0..1)",
             f"over it, in normal channels: {rules.normal}; in NSFW channels: {rules.nsfw}"]
    lines += [f"  <#{channel}>: {action}" for channel, action in sorted(rules.channels.items())]
    lines.append("banned words: " + (", ".join(rules.banned_words) or "none"))
    lines.append("banned patterns: " + (", ".join(f"`{p}`" for p in rules.banned_patterns) or "none"))
    lines.append(f"enforced negative: {rules.enforced_negative or 'none'}")
    for label, values in (("checkpoints allowed", rules.checkpoints_allowed),
                          ("checkpoints blocked", rules.checkpoints_blocked),
                          ("LoRAs allowed", rules.loras_allowed), ("LoRAs blocked", rules.loras_blocked)):
        lines.append(f"{label}: " + (", ".join(values) or ("all" if "allowed" in label else "none")))
    lines.append(f"log channel: <#{rules.log_channel}>" if rules.log_channel else "log channel: none")
    return "\n".join(lines)


class Moderation:
    """The moderators' commands over the SafetyGate's rules and the store's moderation tables."""

    def __init__(self, gate: SafetyGate, store: Store) -> None:
        self.gate, self.store = gate, store
        self._changing = ServerLocks()

    def _server(self, who: Requester, command: str) -> str:
        server = self.gate.server_of(who.guild_id)
        if server is None:
            raise RequestInvalid(f"{command} works in a server: DMs have no moderators")
        return server

    def _may_set_rules(self, who: Requester) -> str:
        server = self._server(who, "/rules")
        if not who.manage_server:
            raise NotAllowed("only members with Manage Server can read or change this server's rules")
        return server

    def _may_moderate(self, who: Requester) -> str:
        server = self._server(who, "/mod")
        if not (who.manage_server or who.can_manage_messages):
            raise NotAllowed("/mod needs Manage Server or Manage Messages in this server")
        return server

    async def rules(self, who: Requester, options: dict[str, Any] | None = None) -> str:
        """/rules: show the server's rules, or change them with `options` (see the module's docstring)."""
        server = self._may_set_rules(who)
        options = {key: value for key, value in (options or {}).items() if value is not None}
        if not options:
            return rules_text(await self.gate.rules(server))
        async with self._changing(server):  # read, change, write: another moderator's change waits, not lost
            current = await self.gate.rules(server)
            if str(options.pop("reset", "")).lower() in ("true", "1", "yes"):
                current = ServerRules.defaults(self.gate.settings)
            changed = current.changed(_changes(current, options))
            await self.gate.put_rules(server, changed)
        warning = ""
        if changed.normal == "allow" or any(action == "allow" for action in changed.channels.values()):
            warning = ("\n⚠️ allow outside NSFW channels: Discord requires adult content to stay in channels marked "
                       "age-restricted")
        return "rules saved:\n" + rules_text(changed) + warning

    async def history(self, who: Requester, user_id: str, limit: int = 10) -> str:
        """/mod history: a member's latest requests here with their scores and what the rules did, and refusals."""
        server = self._may_moderate(who)
        generations = await self.store.member_generations(server, user_id, limit,
                                                          with_no_server=server == self.gate.home_server)
        refusals = await self.store.refusals(server, user_id, limit)
        rows: list[tuple[float, str]] = []
        for generation in generations:
            score = f"NSFW {generation.nsfw_score:.2f}" if generation.nsfw_score is not None else "not scored"
            did = {"block": "held back", "spoiler": "posted as spoiler", "allow": "posted"}.get(
                generation.safety or "", generation.state)
            rows.append((generation.created_at, f"#{generation.id} {generation.kind} · "
                         f"\"{truncate(request_label(generation), 60)}\" · {score} · {did}"))
        rows += [(refusal.at, f"refused {refusal.door}: {truncate(refusal.reason, 120)}") for refusal in refusals]
        rows.sort(key=lambda row: row[0], reverse=True)
        block = await self.store.block_of(server, user_id)
        head = _mention(user_id) + (f" is blocked ({block.reason or 'no reason given'})" if block else "")
        if not rows:
            return f"{head}: no requests here yet"
        return "\n".join([f"{head}, latest first:", *(f"{_when(at)} {line}" for at, line in rows[:limit])])

    async def block(self, who: Requester, user_id: str, reason: str = "") -> str:
        """/mod block: the member's commands and reactions are refused here until unblocked."""
        server = self._may_moderate(who)
        if user_id == who.user_id:
            raise RequestInvalid("you cannot block yourself")
        await self.store.block_member(server, user_id, who.user_id, reason.strip()[:200])
        self.gate.log_line(server, f"⛔ {_mention(user_id)} blocked by {who.name or who.user_id}"
                           + (f": {reason.strip()[:200]}" if reason.strip() else ""))
        return f"blocked {_mention(user_id)}: their commands and reactions are refused here until /mod unblock"

    async def unblock(self, who: Requester, user_id: str) -> str:
        """/mod unblock."""
        server = self._may_moderate(who)
        if not await self.store.unblock_member(server, user_id):
            return f"{_mention(user_id)} was not blocked"
        self.gate.log_line(server, f"✅ {_mention(user_id)} unblocked by {who.name or who.user_id}")
        return f"unblocked {_mention(user_id)}"

    async def blocked(self, who: Requester) -> str:
        """/mod blocked: who is blocked here."""
        server = self._may_moderate(who)
        records = await self.store.blocks(server)
        return "\n".join(f"{_mention(r.user_id)} since {_when(r.blocked_at)} by {_mention(r.blocked_by)}"
                         + (f": {r.reason}" if r.reason else "") for r in records) or "nobody is blocked here"

    async def is_blocked(self, guild_id: str | None, user_id: str) -> bool:
        """Whether `user_id` is blocked in `guild_id` (front ends refuse every command and reaction of theirs)."""
        server = self.gate.server_of(guild_id)
        return server is not None and await self.store.block_of(server, user_id) is not None


def _mention(user_id: str) -> str:
    """A Discord member as Discord shows a mention; anyone else (the console's) by their name."""
    return f"<@{user_id}>" if user_id.isdecimal() else user_id


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))
