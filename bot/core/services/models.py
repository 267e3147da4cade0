"""What can be asked for: the models folder's files, each checkpoint's architecture, /models and /tokens, and the
`RequestContext` a command is checked and built against (read once per command).

Everything here asks the engine service (`choices`, `architecture`, `model_path`, `short_hash`); listing, hashing
and reading a ControlNet's header touch the disk, so they run off the event loop.
"""

from __future__ import annotations

import asyncio

from bot.core.errors import RequestInvalid
from bot.core.requests.imagine import Allowed, RequestContext
from bot.core.requests.names import name_suggestions, resolve_name
from bot.core.requests.tokens import token_text
from bot.settings import Settings
from engine.errors import NoodleError
from engine.models.detect import Arch
from engine.queue import EngineService

__all__ = ["ModelChoices"]


class ModelChoices:
    """The models folder as the services and the front ends see it."""

    def __init__(self, engine: EngineService, settings: Settings, allowed: Allowed) -> None:
        self.engine, self.settings, self.allowed = engine, settings, allowed

    async def context(self) -> RequestContext:
        """The limits, the models folder as it is now and the [bot] defaults: one listing for one command."""
        checkpoints, loras, vaes, controlnets = await asyncio.to_thread(
            lambda: (self.engine.choices("checkpoints"), self.engine.choices("loras"), self.engine.choices("vae"),
                     self.engine.choices("controlnet")))
        return RequestContext(self.allowed, checkpoints, loras, vaes, self.settings.bot, controlnets,
                              self.settings.engine.prompt_syntax)

    async def names(self, folder: str, matching: str = "") -> list[str]:
        """Files of `folder` whose names contain `matching`, prefix matches first (autocomplete)."""
        return name_suggestions(matching, await asyncio.to_thread(self.engine.choices, folder))

    def pick_checkpoint(self, wanted: str | None, available: list[str] | tuple[str, ...]) -> str:
        """The checkpoint a request means: the one named, else [bot] default_model, else the first by name."""
        if not available:
            raise RequestInvalid("models/checkpoints holds no .safetensors file: drop an SD1.5 or SDXL checkpoint "
                                 "there (or run `noodle tiny-models` to try the tiny test models)")
        if wanted:
            return resolve_name("checkpoint", wanted, available, "models/checkpoints")
        configured = self.settings.bot.default_model
        if configured:
            return resolve_name("checkpoint", configured, available, "models/checkpoints ([bot] default_model)")
        return sorted(available)[0]

    async def architecture(self, checkpoint: str) -> Arch:
        """The checkpoint's family from its header (the engine remembers it per file version)."""
        return await asyncio.to_thread(self.engine.architecture, checkpoint)

    async def controlnet_arch(self, name: str) -> Arch | None:
        """The family a ControlNet file is for, from its safetensors header alone (a few KB); None for a pickle
        name (its header is the whole file: the engine reads it, where the owner allows that, and refuses a
        mismatch when it runs). A file that is no ControlNet is refused here with the engine's own words."""
        if not name.lower().endswith(".safetensors"):
            return None
        return await asyncio.to_thread(self.engine.controlnet_architecture, name)

    async def text(self) -> str:
        """/models: checkpoints (architecture, size, short hash), LoRAs, embeddings, ControlNets (family), upscale
        models, hypernetworks, GLIGEN and CLIP vision models of the models folder."""
        lines = ["Checkpoints:"]
        for name in await asyncio.to_thread(self.engine.choices, "checkpoints"):
            try:
                arch = (await self.architecture(name)).name
            except NoodleError as err:  # listed anyway, with why /imagine cannot use it
                arch = f"not loadable: {err}"
            size, digest = await asyncio.to_thread(
                lambda n=name: (self.engine.model_path("checkpoints", n).stat().st_size,
                                self.engine.short_hash("checkpoints", n)))
            lines.append(f"  {name} · {arch} · {size / 1e6:,.1f} MB · {digest}")
        if len(lines) == 1:
            lines.append("  none: put SD1.5 or SDXL .safetensors files in models/checkpoints")
        for title, folder in (("LoRAs", "loras"), ("Embeddings", "embeddings")):
            names = await asyncio.to_thread(self.engine.choices, folder)
            lines.append(f"{title}: {', '.join(names) or f'none (put .safetensors files in models/{folder})'}")
        controlnets = []
        for name in await asyncio.to_thread(self.engine.choices, "controlnet"):
            try:
                arch = await self.controlnet_arch(name)
                family = "" if arch is None else f" ({arch.label})"
            except NoodleError as err:  # listed anyway, with why /imagine cannot use it
                family = f" (not loadable: {err})"
            controlnets.append(name + family)
        lines.append("ControlNets (/imagine controlnet:): "
                     + (", ".join(controlnets) or "none (put .safetensors files in models/controlnet)"))
        for title, folder in (("Upscale models", "upscale_models"), ("Hypernetworks", "hypernetworks"),
                              ("GLIGEN models", "gligen"), ("CLIP vision models", "clip_vision")):
            names = await asyncio.to_thread(self.engine.choices, folder)
            lines.append(f"{title} (for /workflow): "
                         + (", ".join(names) or f"none (put .safetensors files in models/{folder})"))
        return "\n".join(lines)

    async def tokens(self, text: str) -> str:
        """The token report of `text` (/tokens), with this models folder's embeddings."""
        return await asyncio.to_thread(token_text, text, self.settings.models.dir / "embeddings",
                                       self.settings.limits.max_prompt_chunks, self.settings.engine.prompt_syntax)
