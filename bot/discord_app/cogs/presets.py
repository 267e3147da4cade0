"""/preset create|update|delete|list|show|default: a server's shared /imagine defaults.

Made by `presets_cog` for the same reason as /imagine's cog: the option ranges and choices come from
config.toml and styles.toml, and discord.py reads them from the signature (so no
`from __future__ import annotations` here). Every change is checked for Manage Server by the Studio,
whatever the server's integration settings allow; answers are private to the member who asked.
"""

from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.presets import Preset, preset_details, preset_line
from bot.core.requests.imagine import Allowed
from bot.discord_app.cogs.interaction import (MAX_CHOICES, answer, checkpoint_choices, fixed_choices, matching_choices,
                                              preset_choices,
                                              require_studio)
from bot.discord_app.post import requester_of

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["presets_cog"]

DESCRIBE = {
    "name": "The preset's name (lower-case letters, digits, - and _)",
    "model": "Checkpoint file from the models folder",
    "loras": "LoRAs with strengths, e.g. detail:0.8, style:0.5:0.3 (model, then clip)",
    "vae": "VAE file from the models folder (the checkpoint's own when left out)",
    "style": "A style of prompts/styles.toml",
    "negative": "What to keep out of the picture",
    "steps": "Sampling steps", "cfg": "CFG scale", "sampler": "Sampler, as in ComfyUI",
    "scheduler": "Noise schedule, as in ComfyUI", "width": "Width in pixels (a multiple of 8)",
    "height": "Height in pixels (a multiple of 8)", "clip_skip": "Skip the last CLIP layers (2 for most anime models)",
}


def presets_cog(studio: "Optional[Studio]", allowed: Allowed, styles: "tuple[str, ...]") -> commands.Cog:
    """The /preset cog for these limits and styles; `studio` None builds it for `--print-commands` only."""
    Name = app_commands.Range[str, 1, 32]
    Negative = app_commands.Range[str, 0, allowed.max_prompt_chars]
    Steps = app_commands.Range[int, 1, allowed.max_steps]
    Cfg = app_commands.Range[float, 0.0, allowed.max_cfg]
    Side = app_commands.Range[int, allowed.min_side, allowed.max_side]
    ClipSkip = app_commands.Range[int, 1, allowed.max_clip_skip]

    def need_studio() -> "Studio":
        return require_studio(studio)

    async def complete_name(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await preset_choices(need_studio(), interaction, current)

    async def complete_model(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await checkpoint_choices(need_studio(), current)

    async def complete_sampler(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return matching_choices(allowed.samplers, current)

    async def complete_vae(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = await need_studio().models.names("vae")
        return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:MAX_CHOICES]

    def preset_of(**options: Any) -> Preset:
        return Preset(**{key: value for key, value in options.items() if value is not None})

    describe = app_commands.describe(**DESCRIBE)
    choose = app_commands.choices(scheduler=fixed_choices(allowed.schedulers), style=fixed_choices(styles))

    class Presets(commands.Cog):
        """A server's shared presets for /imagine."""

        preset = app_commands.Group(name="preset", description="This server's shared /imagine presets",
                                    guild_only=True)

        @preset.command(name="create", description="Save a preset for everyone here (needs Manage Server)")
        @describe
        @choose
        @app_commands.autocomplete(model=complete_model, vae=complete_vae, sampler=complete_sampler)
        async def create(self, interaction: discord.Interaction, name: Name, model: Optional[str] = None,
                         loras: Optional[str] = None, vae: Optional[str] = None, style: Optional[str] = None,
                         negative: Optional[Negative] = None, steps: Optional[Steps] = None,
                         cfg: Optional[Cfg] = None, sampler: Optional[str] = None, scheduler: Optional[str] = None,
                         width: Optional[Side] = None, height: Optional[Side] = None,
                         clip_skip: Optional[ClipSkip] = None) -> None:
            """Check the preset against the models folder and store it."""
            async def work() -> str:
                record = await need_studio().presets.create(requester_of(interaction), preset_of(
                    name=name, model=model, loras=loras, vae=vae, style=style, negative=negative, steps=steps,
                    cfg=cfg, sampler=sampler, scheduler=scheduler, width=width, height=height, clip_skip=clip_skip))
                return (f"✅ Saved preset {preset_line(record, markdown=True)}; use it with "
                        f"/imagine preset:{record.preset.name}")
            await answer(interaction, work())

        @preset.command(name="update", description="Change options of a preset (needs Manage Server)")
        @describe
        @choose
        @app_commands.autocomplete(name=complete_name, model=complete_model, vae=complete_vae,
                                   sampler=complete_sampler)
        async def update(self, interaction: discord.Interaction, name: Name, model: Optional[str] = None,
                         loras: Optional[str] = None, vae: Optional[str] = None, style: Optional[str] = None,
                         negative: Optional[Negative] = None, steps: Optional[Steps] = None,
                         cfg: Optional[Cfg] = None, sampler: Optional[str] = None, scheduler: Optional[str] = None,
                         width: Optional[Side] = None, height: Optional[Side] = None,
                         clip_skip: Optional[ClipSkip] = None) -> None:
            """Change the options given; the others stay."""
            async def work() -> str:
                record = await need_studio().presets.update(requester_of(interaction), preset_of(
                    name=name, model=model, loras=loras, vae=vae, style=style, negative=negative, steps=steps,
                    cfg=cfg, sampler=sampler, scheduler=scheduler, width=width, height=height, clip_skip=clip_skip))
                return f"✅ Updated preset {preset_line(record, markdown=True)}"
            await answer(interaction, work())

        @preset.command(name="delete", description="Delete a preset (needs Manage Server)")
        @app_commands.describe(name=DESCRIBE["name"])
        @app_commands.autocomplete(name=complete_name)
        async def delete(self, interaction: discord.Interaction, name: Name) -> None:
            """Delete it (results made with it stay)."""
            async def work() -> str:
                await need_studio().presets.delete(requester_of(interaction), name)
                return f"🗑️ Deleted preset {name}"
            await answer(interaction, work())

        @preset.command(name="default", description="Set (without a name: clear) the preset /imagine uses here by "
                                                     "default (needs Manage Server)")
        @app_commands.describe(name=DESCRIBE["name"])
        @app_commands.autocomplete(name=complete_name)
        async def default(self, interaction: discord.Interaction, name: Optional[Name] = None) -> None:
            """Set or clear the server's default preset."""
            async def work() -> str:
                chosen = await need_studio().presets.set_default(requester_of(interaction), name)
                return f"⭐ Default preset: {chosen}" if chosen else "⭐ No default preset now"
            await answer(interaction, work())

        @preset.command(name="list", description="This server's presets (broken ones are marked)")
        async def list_(self, interaction: discord.Interaction) -> None:
            """Every preset, the default marked ⭐, broken ones ⚠️ with their missing files."""
            async def work() -> str:
                guild = str(interaction.guild_id) if interaction.guild_id else None
                records = await need_studio().presets.of_server(guild)
                default = await need_studio().presets.default(guild)
                if not records:
                    return "No presets here yet; a member with Manage Server makes one with /preset create"
                return "\n".join(preset_line(record, default, markdown=True) for record in records)
            await answer(interaction, work())

        @preset.command(name="show", description="One preset's options, maker and state")
        @app_commands.describe(name=DESCRIBE["name"])
        @app_commands.autocomplete(name=complete_name)
        async def show(self, interaction: discord.Interaction, name: Name) -> None:
            """The preset with who made it and whether it is broken."""
            async def work() -> str:
                guild = str(interaction.guild_id) if interaction.guild_id else None
                record = await need_studio().presets.show(guild, name)
                return preset_details(record, await need_studio().presets.default(guild), markdown=True)
            await answer(interaction, work())

    return Presets()
