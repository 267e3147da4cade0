"""`SafetyGate`: the one place a server's rules are kept, at the one place every request passes.

Every door (/imagine and its presets, 🔁, 🔀, the buttons, ✏️ remix, /workflow and its reroll) ends in
`RequestQueue.enqueue` with the request's final graphs, and `admit` is called there: a blocked member is
refused, every prompt box of every graph is matched against the banned words and patterns (after the style,
the preset, the wildcards and the `<lora:>` tags have all been expanded into it), every checkpoint and LoRA a
loader names is held to the allow and block lists, and the enforced negative is written into every sampler's
negative conditioning (bot/core/safety/graph.py). `check_typed` also reads the prompt as the member typed it,
so an inline `{cat|nude}` is refused even when the seed picked `cat`. Each refusal is recorded (/mod history)
and reported to the server's log channel.

After sampling, `review` scores a result's images (off the event loop) and decides from the rules of the
channel it goes to what the front end does with it: allow, spoiler or block. An upload is scored before it is
queued (`check_upload`). A request made outside any server follows config.toml's [safety]; the console is a
server of its own (`home_server`).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from bot.core.safety.graph import (NegativeNotApplied, guidance_below_one, model_files, negative_only, prompt_texts,
                                   with_negative)
from bot.core.safety.nsfw import NsfwScorer, UnreadableImage
from bot.core.safety.rules import ImageAction, ServerRules
from bot.core.safety.words import Banned, find_banned, holds_phrase
from bot.core.storage.records import Generation, NewGeneration
from bot.core.storage.store import Store
from bot.settings import SafetySettings
from prompts.plan import Syntax

__all__ = ["BLOCKED_TEXT", "MemberBlocked", "Report", "RuleRefused", "SafetyGate", "blocked_text"]

log = logging.getLogger(__name__)
RULES_KEY = "rules"  # the settings row (scope guild) holding a server's ServerRules
# a report for the log channel: (guild, channel id, text, image paths to attach behind a spoiler)
Report = Callable[[str, str, str, Sequence[str]], Awaitable[None]]
BLOCKED_TEXT = ("the moderators of this server blocked you from using Noodle here; ask them if you think this is a "
                "mistake")


class RuleRefused(RequestInvalid):
    """A request this server's rules refuse: a banned word, a blocked model, an image over the threshold."""


class MemberBlocked(RuleRefused):
    """A member this server's moderators blocked."""


def blocked_text(generation: Generation) -> str:
    """What the requester of a held-back result is told (privately)."""
    score = f"{generation.nsfw_score:.2f}" if generation.nsfw_score is not None else "?"
    return (f"🚫 #{generation.id} was not posted: the NSFW classifier scored it {score}, over this server's "
            "threshold, and its rules hold such results back here. Moderators can see it; try an NSFW channel "
            "or change the prompt")


class SafetyGate:
    """Rules per server, member blocks, prompt and model checks, and the classifier's verdict on images."""

    def __init__(self, store: Store, settings: SafetySettings, scorer: NsfwScorer | None, *,
                 home_server: str | None = None, owner_negative: str = "", syntax: Syntax = "noodle") -> None:
        self.store, self.settings, self.scorer = store, settings, scorer
        self.syntax = syntax  # [engine] prompt_syntax: texts are matched as the engine's encode will read them
        # [bot] default_negative: the owner's words, put in a negative for members who give none (never theirs)
        self.owner_negative = owner_negative.strip()
        self.home_server = home_server  # the server of requests that name none (the console's own)
        self.report: Report | None = None  # set by the front end that can post to a log channel
        self._tasks: set[asyncio.Task[None]] = set()

    # -- rules -----------------------------------------------------------------------------------

    def server_of(self, guild_id: str | None) -> str | None:
        """The server whose rules apply to a request made in `guild_id` (None: outside any server)."""
        return guild_id or self.home_server

    async def rules(self, guild_id: str | None) -> ServerRules:
        """A server's rules: what its moderators set with /rules, else config.toml's [safety]."""
        defaults = ServerRules.defaults(self.settings)
        server = self.server_of(guild_id)
        if server is None:
            return defaults.model_copy(update={"normal": self.settings.without_server,
                                               "nsfw": self.settings.without_server})
        stored = await self.store.get_setting("guild", server, RULES_KEY)
        if stored is None:
            return defaults
        try:
            return ServerRules.model_validate(stored)
        except ValueError as err:  # a row an older Noodle wrote, or edited by hand: say so, keep the defaults
            log.error("the rules of server %s cannot be read (%s); config.toml's [safety] applies", server, err)
            return defaults

    async def put_rules(self, guild_id: str, rules: ServerRules) -> None:
        """Store a server's rules (the Moderation service checks who may)."""
        await self.store.put_setting("guild", guild_id, RULES_KEY, rules.model_dump(mode="json"))

    async def with_enforced(self, guild_id: str | None, negative: str) -> str:
        """`negative` with the server's enforced negative appended (once), as the card and the PNG show it."""
        server = self.server_of(guild_id)
        enforced = (await self.rules(server)).enforced_negative.strip() if server is not None else ""
        if not enforced or holds_phrase(negative, enforced, self.syntax):
            return negative
        return f"{negative.rstrip().rstrip(',')}, {enforced}" if negative.strip() else enforced

    # -- before queueing -------------------------------------------------------------------------

    async def check_member(self, guild_id: str | None, who: Requester) -> None:
        """MemberBlocked when `who` is blocked in the server of `guild_id`."""
        server = self.server_of(guild_id)
        if server is None:
            return
        block = await self.store.block_of(server, who.user_id)
        if block is not None:
            reason = f" ({block.reason})" if block.reason else ""
            raise MemberBlocked(BLOCKED_TEXT.replace(" here;", f" here{reason};"))

    async def check_typed(self, guild_id: str | None, who: Requester, door: str, texts: dict[str, str]) -> None:
        """Refuse text as the member typed it (label -> text: `prompt`, `negative`) that holds a banned word."""
        server = self.server_of(guild_id)
        if server is None:
            return
        rules = await self.rules(server)
        for label, text in texts.items():
            if label == "negative":
                text = self._members_part(text, rules)
            found = find_banned([text], rules.banned_words, rules.banned_patterns, self.syntax)
            if found is not None:
                raise await self._refuse(server, who, door, _banned_line(found, f"your {label}"), text)

    async def admit(self, new: NewGeneration, who: Requester) -> NewGeneration:
        """`new` as the rules let it be queued (the enforced negative in each graph), or RuleRefused."""
        server = self.server_of(new.guild_id)
        if server is None:
            return new
        try:
            await self.check_member(server, who)
        except MemberBlocked as err:
            raise await self._refuse(server, who, new.kind, str(err), _prompt_of(new), MemberBlocked) from None
        rules = await self.rules(server)
        images = []
        for seed, workflow in new.images:
            problem = self._graph_problem(new, workflow, rules)
            if problem is not None:
                raise await self._refuse(server, who, new.kind, problem, _prompt_of(new))
            try:
                images.append((seed, with_negative(workflow, rules.enforced_negative, self.syntax)))
            except NegativeNotApplied as err:
                raise await self._refuse(server, who, new.kind, str(err), _prompt_of(new)) from None
        return replace(new, images=images)

    def _graph_problem(self, new: NewGeneration, workflow: dict[str, Any], rules: ServerRules) -> str | None:
        """Why the rules refuse this graph, or None."""
        workflow_kind = "source" in new.params  # a /workflow upload or its reroll
        if not workflow_kind:  # Noodle's own graph: name the member's words as they know them
            for label in ("prompt", "negative"):
                text = new.params.get(label)
                if label == "negative" and isinstance(text, str):
                    text = self._members_part(text, rules)
                found = find_banned([text], rules.banned_words, rules.banned_patterns, self.syntax) \
                    if isinstance(text, str) else None
                if found is not None:
                    return _banned_line(found, f"the {label}" + (" (after its style, preset and wildcards)"
                                                                if label == "prompt" else ""))
        negatives = negative_only(workflow)
        for box in prompt_texts(workflow):
            text = self._members_part(box.text, rules) if box.node_id in negatives else box.text
            found = find_banned([text], rules.banned_words, rules.banned_patterns, self.syntax)
            if found is not None:
                where = f"node {box.node_id} ({box.class_type}) {box.name}" if workflow_kind else "the prompt"
                return _banned_line(found, where)
        low = guidance_below_one(workflow) if rules.enforced_negative.strip() else []
        if low:
            where = low[0] if workflow_kind else f"cfg {new.params.get('cfg')}"
            return (f"{where} is under 1: below cfg 1 a sampler draws toward its negative prompt (at 0, the negative "
                    "alone), and this server adds its own negative prompt to every request; use cfg 1 or more")
        files = model_files(workflow)
        for name in files["checkpoints"]:
            if not rules.checkpoint_allowed(name):
                return (f"checkpoint {name!r} is not allowed on this server"
                        + _allowed_hint(rules.checkpoints_allowed, "checkpoints"))
        for name in files["loras"]:
            found = find_banned([Path(name).stem.replace("_", " ")], rules.banned_words, ())
            if not rules.lora_allowed(name) or found is not None:
                return f"LoRA {name!r} is not allowed on this server" + _allowed_hint(rules.loras_allowed, "LoRAs")
        return None

    def _members_part(self, negative: str, rules: ServerRules) -> str:
        """A negative without the words the server enforces and the owner's default negative: a moderator who bans
        `nsfw` and enforces `nsfw, nude` as the negative must not see every request refused for its own words."""
        for phrase in (rules.enforced_negative.strip(), self.owner_negative):
            if phrase:
                negative = negative.replace(phrase, " ")
        return negative

    async def check_upload(self, guild_id: str | None, channel_id: str | None, nsfw_channel: bool, who: Requester,
                           door: str, data: bytes, option: str, *, parent_id: str | None = None) -> float | None:
        """An attached image's score; RuleRefused when it is over the threshold where such results are blocked."""
        if self.scorer is None:
            return None
        try:
            score = await asyncio.to_thread(self.scorer.score, io.BytesIO(data))
        except UnreadableImage:
            return None  # prepare_image has refused it already, with the better words
        rules = await self.rules(guild_id)
        if score >= rules.threshold and rules.image_action(channel_id, nsfw_channel=nsfw_channel,
                                                            parent_id=parent_id) == "block":
            server = self.server_of(guild_id) or ""
            raise await self._refuse(server, who, door, f"{option}: the NSFW classifier scored the attached image "
                                     f"{score:.2f}, over this server's threshold of {rules.threshold:.2f}, and this "
                                     "channel does not take such images; use an NSFW channel or another image", "")
        return score

    async def _refuse(self, server: str, who: Requester, door: str, reason: str, text: str,
                      kind: type[RuleRefused] = RuleRefused) -> RuleRefused:
        """Record a refusal, report it to the log channel, and return the error for the member."""
        try:
            await self.store.add_refusal(server, who.user_id, door, reason, text)
        except Exception as err:  # noqa: BLE001 - the refusal stands even when it cannot be recorded
            log.warning("could not record a refusal in server %s: %s", server, err)
        self._log(server, f"🚫 refused {door} by {_member(who)}: {reason}" + (f"\n> {text[:300]}" if text else ""), ())
        return kind(reason)

    # -- after sampling --------------------------------------------------------------------------

    async def review(self, generation: Generation, *, nsfw_channel: bool, parent_id: str | None = None) -> Generation:
        """Score a finished result's images and decide what is done with it where it goes (`parent_id`: the channel
        of the thread it goes to); stored once."""
        if generation.safety is not None or generation.state != "done":
            return generation
        if self.scorer is None:
            action: ImageAction = "allow"
            scores: list[float] = []
        else:
            rules = await self.rules(generation.guild_id)
            try:
                scores = await asyncio.to_thread(_scores, self.scorer, generation.images)
                over = bool(scores) and max(scores) >= rules.threshold
            except Exception:  # noqa: BLE001 - a classifier that cannot run: the result counts as over, not under
                log.exception("#%s could not be scored; it is treated as over the threshold", generation.id)
                scores, over = [], True
            action = rules.image_action(generation.channel_id, nsfw_channel=nsfw_channel,
                                        parent_id=parent_id) if over else "allow"
        await self.store.record_review(generation.id, scores, action)
        reviewed = replace(generation, nsfw_scores=tuple(round(score, 4) for score in scores), safety=action)
        server = self.server_of(generation.guild_id)
        if action == "block" and server is not None:
            self._log(server, f"🚫 held back #{generation.id} by <@{generation.requester_id}>: NSFW score "
                      f"{reviewed.nsfw_score or 0:.2f} in <#{generation.channel_id}>\n> "
                      f"{str(generation.params.get('prompt') or generation.request.get('filename', ''))[:300]}",
                      generation.images)
        return reviewed

    def log_line(self, server: str, text: str) -> None:
        """Report a moderator's action (a block, an unblock) to the server's log channel."""
        self._log(server, text, ())

    def _log(self, server: str, text: str, images: Sequence[str]) -> None:
        """Post to the server's log channel in the background (a refusal's answer never waits for Discord)."""
        if self.report is None:
            return
        report = self.report

        async def send() -> None:
            rules = await self.rules(server)
            if rules.log_channel:
                try:
                    await report(server, rules.log_channel, text, images)
                except Exception as err:  # noqa: BLE001 - a log channel that refuses must not stop a request
                    log.warning("could not report to log channel %s of server %s: %s", rules.log_channel, server, err)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the log reports still being sent (tests, and a clean stop)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)


def _scores(scorer: NsfwScorer, paths: Sequence[str]) -> list[float]:
    """Each readable image's score (a PNG gone or broken since it was written is left out, and logged)."""
    scores = []
    for path in paths:
        try:
            scores.append(scorer.score(Path(path)))
        except UnreadableImage as err:
            log.warning("could not score %s: %s", path, err)
    return scores


def _banned_line(found: Banned, where: str) -> str:
    return (f"{where} contains {found.describe()}, which this server's rules do not allow; rephrase it (moderators "
            "set the rules with /rules)")


def _allowed_hint(allowed: Sequence[str], noun: str) -> str:
    return f"; the {noun} allowed here: {', '.join(allowed)}" if allowed else f"; pick another of /models' {noun}"


def _member(who: Requester) -> str:
    return f"<@{who.user_id}>" if who.user_id.isdigit() else (who.name or who.user_id)


def _prompt_of(new: NewGeneration) -> str:
    return str(new.params.get("prompt") or new.params.get("filename") or "")

