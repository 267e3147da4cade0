"""/queue on a real SQLite file with the real Studio and engine: the caller's requests with place and ETA,
cancelling (own, someone else's, a moderator's), the Discord cog with its buttons, and the console."""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import Any

import discord
import pytest

from bot.discord_app.cogs.queue import CancelButton, QueueView, queue_cog
from bot.console.app import Console, LineReader
from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.front_end import Requester
from tests.bot.conftest import WAIT, Env, _origin
from tests.bot.fakes import FakeInteraction
from tests.engine.queue.service_support import GATE_SEED, Gate

ALICE = Requester("42", "777", "alice")
BOB = Requester("43", "777", "bob")
MODERATOR = Requester("44", "777", "mod", can_manage_messages=True)


async def queued(env: Env, who: Requester, **options: Any) -> Any:
    request = await env.studio.generations.parse({"prompt": "a red fox", "steps": 4, "width": 64, "height": 64, **options})
    return await env.studio.generations.submit(request, who, _origin(env.channel))


@pytest.fixture
async def busy(env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The engine held in the sampler of Bob's job until the test opens the gate."""
    gate = Gate(monkeypatch)
    # a negative of its own keeps its sampler out of the engine's output cache (one executor per session)
    ticket = await queued(env, BOB, seed=GATE_SEED, prompt="the job that holds the queue", negative=uuid.uuid4().hex)
    await gate.wait_entered()
    yield gate, ticket
    gate.open()


async def test_lists_the_callers_requests_with_place_and_eta(env: Env, busy: Any) -> None:
    gate, bobs = busy
    first = await queued(env, ALICE, batch=2)
    second = await queued(env, ALICE, prompt="a blue heron")
    entries = await env.studio.queue.entries(ALICE)
    assert [e.generation_id for e in entries] == [first.generation_id, second.generation_id]
    assert [e.images for e in entries] == [2, 1]
    assert not any(e.running for e in entries)
    assert entries[0].position is not None and entries[1].position is not None
    assert entries[0].position < entries[1].position  # the queue's order
    assert entries[1].prompt == "a blue heron"
    # Bob sees only his running request, not Alice's
    [bob] = await env.studio.queue.entries(BOB)
    assert bob.generation_id == bobs.generation_id and bob.running and bob.position is None
    assert "running" in bob.line() and f"#{bobs.generation_id}" in bob.line()
    line = entries[1].line()
    assert f"#{second.generation_id}" in line and f"position {entries[1].position}" in line
    gate.open()
    await env.finish(second)
    assert await env.studio.queue.entries(ALICE) == []


async def test_the_eta_appears_once_the_engine_knows_its_pace(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.run({"prompt": "warm up the step rate"})  # the queue learns seconds per step from finished jobs
    gate = Gate(monkeypatch)
    await queued(env, BOB, seed=GATE_SEED, negative=uuid.uuid4().hex)
    await gate.wait_entered()
    try:
        await queued(env, ALICE)
        [entry] = await env.studio.queue.entries(ALICE)
        assert entry.eta_s is not None and entry.eta_s > 0
        assert "left" in entry.line()
    finally:
        gate.open()


async def test_cancel_own_request_takes_every_image_out_and_settles_it_cancelled(env: Env, busy: Any) -> None:
    ticket = await queued(env, ALICE, batch=2)
    assert await env.studio.queue.cancel(ALICE, ticket.generation_id) == 2
    final = await asyncio.wait_for(env.finish(ticket), WAIT)
    assert final.kind == "failed"
    generation = await env.studio.generations.get(ticket.generation_id)
    assert generation.state == "cancelled" and all(job.state == "cancelled" for job in generation.jobs)
    assert await env.studio.queue.entries(ALICE) == []
    with pytest.raises(RequestInvalid, match="nothing queued or running"):
        await env.studio.queue.cancel(ALICE, ticket.generation_id)


async def test_a_running_request_stops_at_its_next_step(env: Env, busy: Any) -> None:
    gate, bobs = busy
    assert await env.studio.queue.cancel(BOB, bobs.generation_id) == 1
    gate.open()
    await asyncio.wait_for(env.finish(bobs), WAIT)
    assert (await env.studio.generations.get(bobs.generation_id)).state == "cancelled"


async def test_a_cancelled_running_request_is_redrawn_as_cancelling_without_a_button(env: Env, busy: Any) -> None:
    # the engine stops a running job at its next sampler step: until then /queue must not call it running
    gate, bobs = busy
    [listed] = await env.studio.queue.entries(BOB)
    press = FakeInteraction(user_id=43)
    press.response = ComponentResponse()  # type: ignore[assignment]
    await CancelButton(env.studio, listed).callback(press)  # type: ignore[arg-type]
    [redraw] = press.response.edits
    assert redraw["content"].startswith(f"🛑 Cancelled #{bobs.generation_id}")
    listing, engine = redraw["content"].split("\n\nEngine: ")  # the engine's worker still runs it, truly
    assert "cancelling" in listing and "running" not in listing and f"running #{bobs.generation_id}" in engine
    assert redraw["view"] is None  # nothing left to cancel
    [entry] = await env.studio.queue.entries(BOB)  # a later /queue says the same
    assert entry.cancelling and "cancelling" in entry.line()
    gate.open()
    await asyncio.wait_for(env.finish(bobs), WAIT)
    assert await env.studio.queue.entries(BOB) == []


async def test_only_the_requester_or_a_moderator_may_cancel(env: Env, busy: Any) -> None:
    ticket = await queued(env, ALICE)
    with pytest.raises(NotAllowed, match="someone else's"):
        await env.studio.queue.cancel(BOB, ticket.generation_id)
    assert len(await env.studio.queue.entries(ALICE)) == 1  # still queued
    assert await env.studio.queue.cancel(MODERATOR, ticket.generation_id) == 1
    with pytest.raises(Exception, match="no request #999"):
        await env.studio.queue.cancel(ALICE, 999)


class ComponentResponse:
    """A button press's response: records the redraw."""

    def __init__(self) -> None:
        self.edits: list[dict[str, Any]] = []

    async def edit_message(self, **kwargs: Any) -> None:
        self.edits.append(kwargs)


async def test_the_cog_lists_privately_with_a_cancel_button_per_request(env: Env, busy: Any) -> None:
    first = await queued(env, ALICE)
    second = await queued(env, ALICE)
    cog = queue_cog(env.studio)
    interaction = FakeInteraction(user_id=42)
    views: list[Any] = []

    async def edit(*, content: str | None = None, view: Any = None, **_: Any) -> None:
        interaction.edits.append(content or "")
        views.append(view)

    interaction.edit_original_response = edit  # type: ignore[method-assign]
    await cog.queue.callback(cog, interaction)
    assert interaction.response.calls == [("defer", {"ephemeral": True, "thinking": True})]
    assert f"#{first.generation_id}" in interaction.edits[-1] and f"#{second.generation_id}" in interaction.edits[-1]
    [view] = views
    assert isinstance(view, QueueView)
    labels = [item.label for item in view.children]
    assert labels == [f"Cancel #{first.generation_id}", f"Cancel #{second.generation_id}"]

    # pressing a button cancels that request and redraws the list without it
    button = view.children[0]
    assert isinstance(button, CancelButton)
    press = FakeInteraction(user_id=42)
    press.response = ComponentResponse()  # type: ignore[assignment]
    await button.callback(press)  # type: ignore[arg-type]
    [redraw] = press.response.edits
    assert redraw["content"].startswith(f"🛑 Cancelled #{first.generation_id}")
    assert f"#{second.generation_id}" in redraw["content"]
    assert [item.label for item in redraw["view"].children] == [f"Cancel #{second.generation_id}"]

    # someone else's button press (they cannot see it, but a forged one) is refused
    forged = FakeInteraction(user_id=43)
    forged.response = ComponentResponse()  # type: ignore[assignment]
    await CancelButton(env.studio, (await env.studio.queue.entries(ALICE))[0]).callback(forged)  # type: ignore[arg-type]
    assert "someone else's" in forged.response.edits[0]["content"]

    # the cancel: option, then nothing left: no buttons
    interaction = FakeInteraction(user_id=42)
    views.clear()
    interaction.edit_original_response = edit  # type: ignore[method-assign]
    await cog.queue.callback(cog, interaction, cancel=second.generation_id)
    assert interaction.edits[-1].startswith(f"🛑 Cancelled #{second.generation_id}")
    assert "Nothing of yours is queued" in interaction.edits[-1]


async def test_the_command_is_in_the_sync_payload(settings: Any) -> None:
    from bot.discord_app.client import command_payloads

    payload = {command["name"]: command for command in await command_payloads(settings)}
    [option] = payload["queue"]["options"]
    assert option["name"] == "cancel" and option["type"] == discord.AppCommandOptionType.integer.value
    assert not option.get("required", False)


class ConsoleOut(io.StringIO):
    """The console's output; a test waits for a line in it, woken by each write, instead of polling."""

    def __init__(self) -> None:
        super().__init__()
        self._wrote = asyncio.Event()

    def write(self, text: str) -> int:
        self._wrote.set()  # the console prints on the event loop's thread
        return super().write(text)

    async def until(self, text: str) -> None:
        async with asyncio.timeout(WAIT):
            while text not in self.getvalue():
                self._wrote.clear()
                await self._wrote.wait()


async def test_the_console_queues_in_the_background_lists_and_cancels(env: Env, busy: Any) -> None:
    gate, _ = busy
    out = ConsoleOut()
    console = Console(env.studio, out, io.StringIO(), interactive=False, user="42")
    console.who = ALICE
    await console.handle("/imagine prompt: a red fox steps: 4 width: 64 height: 64 &")
    [entry] = await env.studio.queue.entries(ALICE)  # queued before handle returns; only the following is detached
    await console.handle("/queue")
    assert f"#{entry.generation_id} imagine" in out.getvalue() and "/queue cancel: NUMBER" in out.getvalue()
    await console.handle(f"/queue cancel: {entry.generation_id}")
    assert f"cancelled #{entry.generation_id} (1 image(s) stopped)" in out.getvalue()
    await console.handle("/queue cancel: soon")
    assert "takes only cancel: NUMBER" in out.getvalue()
    gate.open()
    await out.until("was cancelled")  # the background follower reports the cancellation as such, not as a failure
    assert f"(#{entry.generation_id}) was cancelled" in out.getvalue() and "error: job" not in out.getvalue()
    # it was being followed, so no "failed" notice goes to the channel as well
    assert not [m for m in env.channel.sent if "cancelled" in (m.content or "")]
    reader = LineReader(io.StringIO(""))
    assert await console.run(reader) == 1  # waits for the background command; the bad /queue line failed
    assert not console._background
