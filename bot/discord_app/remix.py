"""✏️ Remix: a Discord modal pre-filled with a result's prompt, negative, steps, cfg and seed (from
`studio.actions.remix_form`); submitting queues the edited request through `studio.actions.remix`, and a bad value
is refused in the modal's own (private) reply with what is allowed.

The modal is the press's response (Discord allows nothing else first), so its defaults are read before answering:
one SQLite read, well inside the 3 s. A modal lives in discord.py's memory only; after a restart ✏️ opens a new one.
"""

from __future__ import annotations

from typing import Any, Protocol

import discord

from bot.core.services.actions import RemixForm
from bot.discord_app.cogs.interaction import announce_and_follow, reply
from bot.discord_app.post import requester_of
from bot.discord_app.cogs.tasks import CogTasks
from engine.errors import NoodleError

__all__ = ["MODAL_SECONDS", "PROMPT_MAX", "RemixModal"]

PROMPT_MAX = 4000  # Discord's limit for a text input's value
SHORT_MAX = 40
MODAL_SECONDS = 30 * 60  # a modal left open longer is forgotten (its submit then fails in Discord, not here)


class ModalOwner(Protocol):
    """What the modal needs of the buttons cog (bot/discord_app/cogs/buttons.py), which imports this module."""

    studio: Any
    tasks: CogTasks
    status_every: float


class RemixModal(discord.ui.Modal):
    """The remix form of result `generation_id`; `owner` is the buttons cog (the Studio, the status followers)."""

    def __init__(self, owner: ModalOwner, generation_id: int, form: RemixForm, *, key: int) -> None:
        super().__init__(title=f"Remix #{generation_id}", timeout=MODAL_SECONDS,
                         custom_id=f"nd1-remix:{generation_id}:{key}")
        self.owner, self.generation_id = owner, generation_id
        def text(label: str, custom_id: str, default: str, *, paragraph: bool = False, required: bool = True,
                 max_length: int = SHORT_MAX) -> discord.ui.TextInput[Any]:
            style = discord.TextStyle.paragraph if paragraph else discord.TextStyle.short
            return discord.ui.TextInput(label=label, custom_id=custom_id, style=style, default=default[:max_length],
                                        max_length=max_length, required=required)

        self.prompt = text("Prompt", "prompt", form.prompt, paragraph=True, max_length=PROMPT_MAX)
        self.negative = text("Negative prompt", "negative", form.negative, paragraph=True, required=False,
                             max_length=PROMPT_MAX)
        self.steps = text("Steps", "steps", form.steps)
        self.cfg = text("CFG scale", "cfg", form.cfg)
        self.seed = text("Seed (blank: a new one)", "seed", form.seed, required=False)
        for field in (self.prompt, self.negative, self.steps, self.cfg, self.seed):
            self.add_item(field)

    def edits(self) -> dict[str, str]:
        """The submitted fields as `studio.actions.remix` takes them."""
        return {"prompt": self.prompt.value, "negative": self.negative.value, "steps": self.steps.value,
                "cfg": self.cfg.value, "seed": self.seed.value}

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        """Acknowledge, queue the edited request for whoever submitted, and follow it as a button press is."""
        studio = self.owner.studio
        arrived = studio.clock()
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            ticket = await studio.actions.remix(self.generation_id, requester_of(interaction), self.edits())
        except NoodleError as err:
            await reply(interaction, f"❌ {err}\nPress ✏️ again to fix it (the form starts over from #"
                                     f"{self.generation_id}).")
            return
        await announce_and_follow(self.owner.tasks, studio, interaction, ticket, self.owner.status_every, arrived)
