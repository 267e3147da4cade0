"""/settings: a member's own /imagine defaults (preset, size, steps, negative, private results), kept across sessions;
/tokens: a prompt's token report; /history: the caller's last generations; /models: the models folder.

Layered under a chosen preset and explicit options, over the server's default preset (see
`bot.core.presets.layered`). Made by `settings_cog` so the ranges come from config.toml (no
`from __future__ import annotations`, as in the other cogs).
"""

from typing import TYPE_CHECKING, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.cards.result import history_line
from bot.core.requests.imagine import Allowed
from bot.core.services.user_settings import settings_text
from bot.discord_app.cogs.interaction import preset_choices, reply, require_studio
from bot.discord_app.post import requester_of
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["settings_cog"]


def settings_cog(studio: "Optional[Studio]", allowed: Allowed) -> commands.Cog:
    """The /settings cog for these limits; `studio` None builds it for `--print-commands` only."""
    Negative = app_commands.Range[str, 0, allowed.max_prompt_chars]
    Prompt = app_commands.Range[str, 1, allowed.max_prompt_chars]
    Steps = app_commands.Range[int, 1, allowed.max_steps]
    Side = app_commands.Range[int, allowed.min_side, allowed.max_side]

    def need_studio() -> "Studio":
        return require_studio(studio)

    async def complete_preset(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await preset_choices(need_studio(), interaction, current)

    class UserSettings(commands.Cog):
        """A member's own /imagine defaults."""

        @app_commands.command(name="settings", description="Your own /imagine defaults; with no options, shows them")
        @app_commands.describe(preset="A preset of this server to use when you choose none",
                               width="Default width in pixels", height="Default height in pixels",
                               steps="Default sampling steps", negative="Default negative prompt",
                               private="Send your results to your DMs instead of the channel",
                               clear="Forget all your defaults first")
        @app_commands.autocomplete(preset=complete_preset)
        async def settings(self, interaction: discord.Interaction, preset: Optional[str] = None,
                           width: Optional[Side] = None, height: Optional[Side] = None,
                           steps: Optional[Steps] = None, negative: Optional[Negative] = None,
                           private: Optional[bool] = None, clear: bool = False) -> None:
            """Change the options given (after `clear`), then show them all."""
            await interaction.response.defer(ephemeral=True, thinking=True)
            who = requester_of(interaction)
            try:
                defaults = need_studio().user_defaults
                if clear:
                    await defaults.change(who, dict.fromkeys(await defaults.get(who)))
                changes = {"preset": preset, "width": width, "height": height, "steps": steps, "negative": negative,
                           "private": private}
                current = await defaults.change(who, {key: value for key, value in changes.items()
                                                      if value is not None})
                text = f"✅ {settings_text(current)}"
            except NoodleError as err:
                text = f"❌ {err}"
            await reply(interaction, text)

        @app_commands.command(name="tokens", description="Count a prompt's CLIP tokens (75 per chunk) before "
                                                         "running it")
        @app_commands.describe(text="The prompt, as you would give it to /imagine")
        async def tokens(self, interaction: discord.Interaction, text: Prompt) -> None:
            """The token report, privately."""
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                answer = await need_studio().models.tokens(text)
            except NoodleError as err:
                answer = f"❌ {err}"
            await reply(interaction, answer)

        @app_commands.command(name="history", description="Your last generations, with links to the results")
        @app_commands.describe(count="How many (newest first)")
        async def history(self, interaction: discord.Interaction,
                          count: app_commands.Range[int, 1, 25] = 10) -> None:
            """The caller's own generations, privately."""
            await interaction.response.defer(ephemeral=True, thinking=True)
            found = await need_studio().generations.history(requester_of(interaction), count)
            await reply(interaction, "\n".join(history_line(g) for g in found) or "No generations yet; try /imagine")

        @app_commands.command(name="models", description="Checkpoints (architecture, size, hash), LoRAs, "
                                                         "embeddings, ControlNets and upscalers available here")
        async def models(self, interaction: discord.Interaction) -> None:
            """The models folder, privately (the first listing hashes each checkpoint once)."""
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                text = await need_studio().models.text()
            except NoodleError as err:
                text = f"❌ {err}"
            await reply(interaction, text)

    return UserSettings()
