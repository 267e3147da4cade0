"""Settings: config.toml through pydantic-settings, secrets from the environment.

Built once in the entry point and passed down; nothing else reads the file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from engine.settings import EngineSettings, Limits, ModelsSettings, QueueSettings, RaySettings


class BotSettings(BaseModel):
    """The `[bot]` table: what both front ends (Discord and `noodle chat`) default to and allow."""

    # One SQLite file for the bot's history and the engine's job queue (WAL: both write to it).
    database: Path = Path("noodle.sqlite3")
    # Results are written under [engine] output_dir in this folder (SaveImage only writes inside
    # the output folder); attachments and variation sources go under [engine] input_dir.
    results_folder: str = "noodle"
    uploads_folder: str = "noodle-uploads"
    # Empty: the first checkpoint of the models folder (tiny-sd15 when only the tiny models are there).
    default_model: str = ""
    default_negative: str = ""
    default_steps: int = Field(20, ge=1)
    default_cfg: float = Field(7.0, ge=0.0)
    default_sampler: str = "euler"
    default_scheduler: str = "normal"
    # Default side by the checkpoint's architecture; the tiny test models default to 64.
    size_sd15: int = Field(512, ge=64)
    size_sdxl: int = Field(1024, ge=64)
    min_side: int = Field(64, ge=8)
    max_cfg: float = Field(30.0, gt=0.0, le=100.0)
    max_batch: int = Field(4, ge=1, le=4)
    max_clip_skip: int = Field(12, ge=1, le=24)
    img2img_denoise: float = Field(0.75, gt=0.0, le=1.0)
    variation_denoise: float = Field(0.6, gt=0.0, le=1.0)
    # U1-U4: enlarge by this factor (held per image to [limits] max_side and max_pixels), then a second pass at a
    # low denoise ("hires fix"). upscale_model: "" the upscaler of models/upscale_models whose scale is closest to
    # the factor (the latent path when there is none), "latent" always the latent path, or a file's name.
    upscale_factor: float = Field(2.0, gt=1.0, le=8.0)
    upscale_model: str = ""
    upscale_denoise: float = Field(0.35, gt=0.0, le=1.0)  # after an upscale model
    upscale_latent_denoise: float = Field(0.55, gt=0.0, le=1.0)  # after a latent upscale (ComfyUI's example: 0.5)
    vary_subtle_denoise: float = Field(0.35, gt=0.0, le=1.0)
    vary_strong_denoise: float = Field(0.7, gt=0.0, le=1.0)  # also V1-V4
    # Zoom out and pan: "" an inpainting checkpoint of the parent's family when models/checkpoints has one, "none"
    # masked sampling on the parent's own model, or a checkpoint's name.
    outpaint_model: str = ""
    # Discord allows about one edit a second per message before rate limits bite; 2 s leaves room.
    status_edit_seconds: float = Field(2.0, ge=0.5)
    max_attachment_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # How long a front end waits for a finished job to be stored and posted before it gives up.
    publish_timeout_seconds: float = Field(300.0, gt=0.0)
    # While Discord cannot be reached the bot retries its login after 5 s, doubling up to 5 min (the engine runs
    # queued jobs meanwhile); a bad token is not retried.
    connect_retry_first_seconds: float = Field(5.0, gt=0.0)
    connect_retry_max_seconds: float = Field(300.0, gt=0.0)
    # Node types /workflow refuses (on Discord and in `noodle chat`): CheckpointSave writes a multi-GB
    # checkpoint file on this machine every time it runs; SaveLatent a .latent file per node (a graph of hundreds
    # of them fills the disk) that no result posts and neither 🗑️ nor retention removes.
    workflow_blocked_nodes: tuple[str, ...] = ("CheckpointSave", "SaveLatent")
    # A batch of 2-4 is shown as one grid image; its PNGs (each with its recipe) are "attach"ed beside it, or sent
    # on ℹ️ ("details") so the message shows the grid alone.
    grid_files: Literal["attach", "details"] = "attach"

    @field_validator("results_folder", "uploads_folder")
    @classmethod
    def _a_folder_inside(cls, value: str) -> str:
        """Results are SaveImage prefixes and uploads files under the engine's folders: a folder that leaves them
        would fail every request (and retention would leave it alone), so it is refused when the file is read."""
        path = PurePosixPath(value.replace("\\", "/"))
        if "\x00" in value or path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError("must name a folder inside the engine's folder ([engine] output_dir or input_dir), "
                             "such as 'noodle' or 'discord/noodle'")
        return value

    def sampler_problem(self) -> str | None:
        """Why the default sampler, scheduler and steps cannot run, or None: they are what most requests run, and a
        pair Noodle refuses (a typo, or one it cannot reproduce faithfully) would refuse every request that does not
        name its own. Asked by `Settings` when the file is read, not here when a BotSettings is built: the sampler
        tables import diffusers (seconds), and `Settings`' own default BotSettings is built when this module is
        imported."""
        from engine.samplers.names import SCHEDULER_NAMES, SUPPORTED_SAMPLERS, UnfaithfulSampler
        from engine.samplers.plan import check_pair

        if self.default_sampler not in SUPPORTED_SAMPLERS:
            return (f"[bot] default_sampler {self.default_sampler!r} is not one of Noodle's samplers: "
                    f"{', '.join(SUPPORTED_SAMPLERS)}")
        if self.default_scheduler not in SCHEDULER_NAMES:
            return (f"[bot] default_scheduler {self.default_scheduler!r} is not one of ComfyUI's schedulers: "
                    f"{', '.join(SCHEDULER_NAMES)}")
        try:
            check_pair(self.default_sampler, self.default_scheduler, self.default_steps)
        except UnfaithfulSampler as err:
            return f"[bot] default_sampler, default_scheduler and default_steps: {err}"
        return None


class RetentionSettings(BaseModel):
    """The `[retention]` table: how long uploads, the engine's finished job rows and results are kept (0: for ever).

    Pruned at start and then every `check_every_hours`; files of requests still queued or running stay."""

    # Attachments and variation sources under [engine] input_dir/[bot] uploads_folder, by last use.
    uploads_days: float = Field(30.0, ge=0.0)
    # Finished rows of the engine's queue table (the bot's history keeps what a result needs).
    job_rows_days: float = Field(30.0, ge=0.0)
    # Result PNGs under [engine] output_dir/[bot] results_folder; their requests are retired as by 🗑️.
    results_days: float = Field(0.0, ge=0.0)
    check_every_hours: float = Field(1.0, gt=0.0)


class SafetySettings(BaseModel):
    """The `[safety]` table: the NSFW classifier, and the rules of a server whose moderators set none (/rules)."""

    classifier: bool = True  # score every result and upload (open_nsfw, offline); off: nothing is scored or held
    threshold: float = Field(0.8, ge=0.0, le=1.0)  # Yahoo: over 0.8 is very likely NSFW, under 0.2 very likely not
    normal_channels: Literal["allow", "spoiler", "block"] = "block"  # channels not marked NSFW
    nsfw_channels: Literal["allow", "spoiler", "block"] = "allow"  # Discord's age-restricted channels
    without_server: Literal["allow", "spoiler", "block"] = "block"  # a request made in DMs, outside any server
    threads: int = Field(1, ge=1, le=16)  # onnxruntime threads: one keeps the classifier off the sampler's cores


def config_path() -> Path:
    """config.toml in the working folder, or the file NOODLE_CONFIG names."""
    return Path(os.environ.get("NOODLE_CONFIG", "config.toml"))


class Settings(BaseSettings):
    """All of Noodle's settings: config.toml first, then NOODLE_* environment variables, then DISCORD_TOKEN."""

    model_config = SettingsConfigDict(env_prefix="NOODLE_", env_nested_delimiter="__", extra="ignore")

    models: ModelsSettings = ModelsSettings()
    engine: EngineSettings = EngineSettings()
    limits: Limits = Limits()
    queue: QueueSettings = QueueSettings()
    ray: RaySettings = RaySettings()
    bot: BotSettings = BotSettings()
    retention: RetentionSettings = RetentionSettings()
    safety: SafetySettings = SafetySettings()
    discord_token: SecretStr | None = None

    @model_validator(mode="after")
    def _bot_within_limits(self) -> Settings:
        """[bot]'s defaults against [limits] and the samplers: a default a request cannot have (a side over max_side,
        steps over max_steps, a sampler that is not there) refuses every request that leaves it out, so the file is
        refused instead, naming what to set."""
        bot, limits = self.bot, self.limits
        problems = [problem] if (problem := bot.sampler_problem()) else []
        if bot.min_side > limits.max_side:
            problems.append(f"[bot] min_side = {bot.min_side} is above [limits] max_side = {limits.max_side}, so no "
                            "size is allowed")
        for key, family in (("size_sd15", "SD1.5"), ("size_sdxl", "SDXL")):
            side = getattr(bot, key)
            wrong = [why for why, holds in (
                ("is not a multiple of 8", side % 8),
                (f"is below [bot] min_side = {bot.min_side}", side < bot.min_side),
                (f"is above [limits] max_side = {limits.max_side}", side > limits.max_side),
                (f"squared is above [limits] max_pixels = {limits.max_pixels}", side * side > limits.max_pixels),
            ) if holds]
            if wrong:
                problems.append(f"[bot] {key} = {side} (the side of an {family} image whose size is not given) "
                                + " and ".join(wrong))
        if bot.default_steps > limits.max_steps:
            problems.append(f"[bot] default_steps = {bot.default_steps} is above [limits] max_steps = "
                            f"{limits.max_steps}")
        if bot.default_cfg > bot.max_cfg:
            problems.append(f"[bot] default_cfg = {bot.default_cfg} is above [bot] max_cfg = {bot.max_cfg}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def cluster(self) -> Any:
        """The engine's Ray workers (engine.cluster.dispatcher.ClusterConfig) when [engine] workers = "ray", else
        None: the engine runs in this process."""
        if self.engine.workers != "ray":
            return None
        from engine.cluster.dispatcher import ClusterConfig  # here: only a Ray set-up needs it

        return ClusterConfig(self.ray, self.models, self.engine)

    def engine_here(self) -> EngineSettings:
        """The [engine] settings of this process's executor. With Ray workers it only validates workflows and lists
        files, so it stays on the CPU (a CUDA context here would cost the first card several hundred MB) and keeps
        no freed memory for sampler steps it never runs (engine/heap.py: the workers do)."""
        if self.engine.workers != "ray":
            return self.engine
        return self.engine.model_copy(update={"device": "cpu", "reuse_cpu_memory": False})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_path())
        return init_settings, env_settings, _DiscordToken(settings_cls), toml


class _DiscordToken(PydanticBaseSettingsSource):
    """DISCORD_TOKEN (no prefix), the variable every Discord bot guide names."""

    def get_field_value(self, field, field_name):  # type: ignore[no-untyped-def]
        return os.environ.get("DISCORD_TOKEN"), field_name, False

    def __call__(self) -> dict[str, object]:
        token = os.environ.get("DISCORD_TOKEN")
        return {"discord_token": token} if token else {}


def unknown_keys(path: Path | None = None) -> list[str]:
    """Keys of the config file that no setting reads (a typo'd `[limit]` or `devcie` is otherwise left out without a
    word), each with the closest known name; empty when the file is not there or does not parse (loading says so)."""
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return _unknown(data, Settings, "")


def _unknown(data: dict[str, Any], model: type[BaseModel], where: str) -> list[str]:
    found = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(model.model_fields), n=1)
            section = f"[{where.rstrip('.')}] " if where else ""
            name = f"[{where}{key}]" if isinstance(value, dict) else f"{section}{key}"
            found.append(name + (f" (did you mean {close[0]}?)" if close else ""))
        elif isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                                            BaseModel):
            found += _unknown(value, field.annotation, f"{where}{key}.")
    return found
