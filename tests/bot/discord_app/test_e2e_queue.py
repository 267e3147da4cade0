"""/queue end to end through the real discord.py on SimCord: the private list, its Cancel button on a running
request (then /queue shows it cancelling), and `cancel:` refusing a request that is not queued any more."""

from __future__ import annotations

from tests.bot.discord_app.e2e_support import SMALL, status_edits
from tests.engine.queue.service_support import GATE_SEED, Gate


async def test_queue_is_private_and_says_when_nothing_is_queued(world) -> None:
    shown = await world.alice.slash(world.channel, "queue")
    assert shown.ephemeral
    [text] = status_edits(world.env, shown)
    assert text and not text.startswith("❌") and shown.response.components == []


async def test_cancelling_a_finished_request_is_refused_with_a_reason(world) -> None:
    await world.alice.slash(world.channel, "imagine", prompt="a fox", **SMALL)
    await world.env.settle()
    answer = await world.alice.slash(world.channel, "queue", cancel=1)
    text = status_edits(world.env, answer)[-1]
    assert text.startswith("❌ ")
    assert len(world.bot_messages()) == 1  # the posted result stays
    stranger = await world.bob.slash(world.channel, "queue", cancel=1)
    assert status_edits(world.env, stranger)[-1].startswith("❌ ")


async def test_the_cancel_button_stops_a_running_request_and_queue_shows_it_cancelling(world, monkeypatch) -> None:
    gate = Gate(monkeypatch)  # holds the job after its first step: running, for as long as the test needs
    world.env.wait_for_engine = False  # settling must not wait for the job the gate holds
    started = await world.alice.slash(world.channel, "imagine", prompt="a held fox", seed=GATE_SEED, steps=4,
                                      width=64, height=64)
    await gate.wait_entered()
    shown = await world.alice.slash(world.channel, "queue")
    listing = status_edits(world.env, shown)[-1]
    assert "#1" in listing and "running" in listing
    assert world.bot_messages() == []
    try:
        clicked = await world.alice.click(shown.response, label="Cancel #1")
        assert clicked.acknowledged
        after_click = (clicked.response.content if clicked.response else "") + " ".join(
            status_edits(world.env, clicked))
        assert "Cancelled #1" in after_click or "Cancelled #1" in shown.response.content
        again = await world.alice.slash(world.channel, "queue")
        text, engine = status_edits(world.env, again)[-1].split("\n\nEngine: ")  # its worker still runs it, truly
        assert "cancelling" in text and "running" not in text.replace("queued or running", "")
        assert "running #1" in engine
    finally:
        gate.open()
        world.env.wait_for_engine = True
    await world.env.settle()  # now until the cancelled job has ended
    await world.env.advance_time(5.0)  # the status edits' throttle window ([bot] status_edit_seconds)
    assert [m for m in world.bot_messages() if m.attachments] == []  # no result for a cancelled request
    assert status_edits(world.env, started)[-1].startswith("❌")  # its own status says it ended without one

