"""The buttons under every result, as a persistent discord.py View: one `DynamicItem` whose template is our
custom_id spelling (bot/core/actions.py, `nd1:42:U2`), so a press is understood after a restart and on a month-old
message with no per-message state: the generation and the action are read back from the custom_id itself.

`result_view(generation)` draws `buttons_for(generation)`; the publisher sends it with every result (channel and
DMs). A press goes to the ResultButtons cog (bot/discord_app/cogs/buttons.py), which acknowledges it at once.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import discord

from bot.core.actions import CUSTOM_ID, Action, ButtonSpec, buttons_for, custom_id, parse_custom_id
from bot.core.storage.records import Generation

__all__ = ["HANDLER_COG", "ResultButton", "result_view"]

log = logging.getLogger(__name__)

HANDLER_COG = "ResultButtons"  # the cog a press is handed to (by name: the item is rebuilt on every press)
_STYLES = {"primary": discord.ButtonStyle.primary, "secondary": discord.ButtonStyle.secondary,
           "success": discord.ButtonStyle.success, "danger": discord.ButtonStyle.danger}


class ResultButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=re.compile(CUSTOM_ID.pattern)):
    """One button of a result: its custom_id carries the generation and the action, nothing else.

    `action` is None for a custom_id of our prefix this Noodle no longer spells (an older version's button):
    the press is answered with what to do instead of being dropped.
    """

    def __init__(self, button: discord.ui.Button[Any], generation_id: int, action: Action | None) -> None:
        super().__init__(button)
        self.generation_id, self.action = generation_id, action

    @classmethod
    def of(cls, generation_id: int, spec: ButtonSpec, row: int) -> ResultButton:
        """The button drawing `spec` on generation `generation_id`, in `row` (0-based)."""
        button: discord.ui.Button[Any] = discord.ui.Button(
            label=spec.label or None, emoji=spec.emoji, style=_STYLES[spec.style],
            custom_id=custom_id(generation_id, spec.action), row=row)
        return cls(button, generation_id, spec.action)

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any],
                             match: re.Match[str], /) -> ResultButton:
        """Rebuild the pressed button from its custom_id alone (no database here: the 3 s count already)."""
        parsed = parse_custom_id(match.group(0))
        generation_id = int(match["generation"])
        assert isinstance(item, discord.ui.Button)
        return cls(item, generation_id, parsed[1] if parsed else None)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Hand the press to the buttons cog, which acknowledges it first."""
        handler = interaction.client.get_cog(HANDLER_COG) if hasattr(interaction.client, "get_cog") else None
        if handler is None:
            await interaction.response.send_message("⏳ Noodle is starting up; press the button again in a "
                                                    "moment", ephemeral=True)
            return
        await handler.press(interaction, self.generation_id, self.action)


def result_view(generation: Generation) -> discord.ui.View:
    """The buttons of `generation`'s result message, row by row as `buttons_for` lays them out (timeout None:
    they never expire)."""
    view = discord.ui.View(timeout=None)
    for row, specs in enumerate(buttons_for(generation)):
        for spec in specs:
            view.add_item(ResultButton.of(generation.id, spec, row))
    return view
