"""The deferred answer of /queue, /preset, /rules and /mod: held to Discord's message length, the cut shown."""

from __future__ import annotations

import asyncio

from bot.discord_app.cogs.interaction import reply
from tests.bot.fakes import FakeInteraction


def test_an_answer_longer_than_a_message_is_cut_to_fit_with_an_ellipsis() -> None:
    interaction = FakeInteraction()
    text = "".join(f"{n:04} " for n in range(560))  # 2,800 characters
    asyncio.run(reply(interaction, text))  # it was text[:2000]: the cut did not show
    assert interaction.edits[0] == text[:1999] + "…"
    asyncio.run(reply(interaction, "short"))
    assert interaction.edits[1] == "short"


def test_a_command_that_fails_on_the_bots_side_is_still_answered() -> None:
    """answer() caught only NoodleError: anything else left the member's private reply at "thinking…"."""
    from bot.discord_app.cogs.interaction import answer

    async def broken() -> str:
        raise KeyError("a bug")

    interaction = FakeInteraction()
    interaction.command = None
    asyncio.run(answer(interaction, broken()))
    assert interaction.edits == ["❌ that failed on the bot's side and was logged for its owner; try again in a "
                                 "moment"]
