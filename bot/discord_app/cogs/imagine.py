"""/imagine: options -> Studio.generations.imagine (layered, checked, queued), acknowledged at once, then live status.

The option ranges and choices come from config.toml (`Allowed`), so the cog class is made by
`imagine_cog`: discord.py reads the signature when the class is created, and the signature is
the schema Discord enforces before a command reaches us. For that reason this module does not
use `from __future__ import annotations` (the annotations must be real objects built from
config values).
"""

from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot.core.requests.imagine import CONTROL_STRENGTH_MAX, DISCORD_INT_MAX, Allowed, ImageUpload, check_upload_meta
from bot.core.requests.names import lora_suggestions
from bot.discord_app.cogs.interaction import (announce_and_follow, checkpoint_choices, file_choices, fixed_choices,
                                              matching_choices,
                                              preset_choices, read_attachment, reply, require_studio)
from bot.discord_app.cogs.tasks import CogTasks
from bot.discord_app.post import origin_of, requester_of
from engine.errors import NoodleError

if TYPE_CHECKING:
    from bot.core.studio import Studio

__all__ = ["imagine_cog"]


def imagine_cog(studio: "Optional[Studio]", allowed: Allowed, *, status_every: float = 2.0) -> commands.Cog:
    """The /imagine cog for these limits; `studio` None builds it for `--print-commands` only."""
    Prompt = app_commands.Range[str, 1, allowed.max_prompt_chars]
    Negative = app_commands.Range[str, 0, allowed.max_prompt_chars]
    Steps = app_commands.Range[int, 1, allowed.max_steps]
    Cfg = app_commands.Range[float, 0.0, allowed.max_cfg]
    Seed = app_commands.Range[int, 0, DISCORD_INT_MAX]
    Side = app_commands.Range[int, allowed.min_side, allowed.max_side]
    Batch = app_commands.Range[int, 1, allowed.max_batch]
    Denoise = app_commands.Range[float, 0.01, 1.0]
    ClipSkip = app_commands.Range[int, 1, allowed.max_clip_skip]
    Strength = app_commands.Range[float, 0.0, CONTROL_STRENGTH_MAX]  # why not ComfyUI's 0..10: requests/imagine.py

    def need_studio() -> "Studio":
        return require_studio(studio)

    async def complete_model(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await checkpoint_choices(need_studio(), current)

    async def complete_preset(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await preset_choices(need_studio(), interaction, current)

    async def complete_controlnet(interaction: discord.Interaction,
                                  current: str) -> list[app_commands.Choice[str]]:
        return await file_choices(need_studio(), "controlnet", current)

    async def complete_sampler(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return matching_choices(allowed.samplers, current)

    async def complete_loras(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = await need_studio().models.names("loras")
        return [app_commands.Choice(name=value, value=value) for value in lora_suggestions(current, names)]

    class Imagine(commands.Cog):
        """Make images from a prompt."""

        def __init__(self) -> None:
            self._tasks = CogTasks()

        async def cog_unload(self) -> None:
            """Stop following jobs (their results are still posted by the Studio)."""
            await self._tasks.cancel_all()

        @app_commands.command(name="imagine", description="Make images from a prompt (Stable Diffusion, "
                                                          "ComfyUI-compatible)")
        @app_commands.describe(
            prompt="What to draw; (word:1.2) weights and <lora:name:0.8> tags work",
            preset="A preset of this server (/preset list); your options override it",
            negative="What to keep out of the picture",
            model="Checkpoint file from the models folder (SD1.x or SDXL)",
            loras="LoRAs with strengths, e.g. detail:0.8, style:0.5",
            steps="Sampling steps, as in ComfyUI's KSampler",
            cfg="How closely to follow the prompt (CFG scale)",
            sampler="Sampler, as in ComfyUI",
            scheduler="Noise schedule, as in ComfyUI",
            seed="Seed for the same picture again; random when left out",
            width="Width in pixels (a multiple of 8); the checkpoint's own size when left out",
            height="Height in pixels (a multiple of 8); the checkpoint's own size when left out",
            batch="How many images",
            image="Start from this image (img2img); its transparent area, if any, is inpainted",
            denoise="With an image: how much to change it (0.3 a little, 0.8 a lot)",
            control_image="Guide the picture with this image through a ControlNet (photo, edge or pose map)",
            controlnet="ControlNet file from the models folder, for the control image",
            control_strength="How strongly the ControlNet guides (1 is ComfyUI's default)",
            control_canny="Edge-detect the control image first (default: yes for a canny ControlNet)",
            clip_skip="Skip the last CLIP layers (2 for most anime models)",
            private="Send the result to your DMs instead of this channel (/settings keeps it for you)",
        )
        @app_commands.choices(scheduler=fixed_choices(allowed.schedulers))
        @app_commands.autocomplete(model=complete_model, loras=complete_loras, preset=complete_preset,
                                   controlnet=complete_controlnet, sampler=complete_sampler)
        async def imagine(self, interaction: discord.Interaction, prompt: Prompt, preset: Optional[str] = None,
                          negative: Optional[Negative] = None, model: Optional[str] = None,
                          loras: Optional[str] = None, steps: Optional[Steps] = None, cfg: Optional[Cfg] = None,
                          sampler: Optional[str] = None, scheduler: Optional[str] = None,
                          seed: Optional[Seed] = None, width: Optional[Side] = None, height: Optional[Side] = None,
                          batch: Optional[Batch] = None, image: Optional[discord.Attachment] = None,
                          denoise: Optional[Denoise] = None, control_image: Optional[discord.Attachment] = None,
                          controlnet: Optional[str] = None, control_strength: Optional[Strength] = None,
                          control_canny: Optional[bool] = None, clip_skip: Optional[ClipSkip] = None,
                          private: Optional[bool] = None) -> None:
            """Queue the images and follow them in a private status message; the result is posted in the channel
            (or, for private results, in the requester's DMs)."""
            arrived = need_studio().clock()  # the token's 15 minutes count from here (interaction.py)
            # Acknowledge first: everything after this may take longer than Discord's 3 seconds.
            # Ephemeral: the status and any refusal are for the requester alone; the result is posted apart.
            await interaction.response.defer(ephemeral=True, thinking=True)
            options: dict[str, Any] = {
                "prompt": prompt, "preset": preset, "negative": negative, "model": model, "loras": loras,
                "steps": steps, "cfg": cfg, "sampler": sampler, "scheduler": scheduler, "seed": seed, "width": width,
                "height": height, "batch": batch, "denoise": denoise, "clip_skip": clip_skip, "private": private,
                "controlnet": controlnet, "control_strength": control_strength, "control_canny": control_canny,
            }
            try:
                if image is not None:
                    options["image"] = await _download(image, allowed, "image")
                if control_image is not None:
                    options["control_image"] = await _download(control_image, allowed, "control_image")
                studio = need_studio()
                who = requester_of(interaction)
                ticket = await studio.generations.imagine({k: v for k, v in options.items() if v is not None}, who,
                                                          origin_of(interaction))
            except NoodleError as err:
                await reply(interaction, f"❌ {err}")
                return
            await announce_and_follow(self._tasks, studio, interaction, ticket, status_every, arrived)

    return Imagine()


async def _download(attachment: discord.Attachment, allowed: Allowed, option: str) -> ImageUpload:
    """The attachment's bytes, refused by its size and type before a byte is downloaded."""
    check_upload_meta(attachment.filename, attachment.content_type, attachment.size, allowed, option)
    data = await read_attachment(attachment, option)
    return ImageUpload(filename=attachment.filename, content_type=attachment.content_type, data=data)
