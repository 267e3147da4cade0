"""Settings: config.toml through pydantic-settings, secrets from the environment.

Built once in the entry point and passed down; nothing else reads the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from engine.settings import EngineSettings, Limits, ModelsSettings


class BotSettings(BaseModel):
    """The Discord side; filled in by the bot's issue."""

    status_edit_seconds: float = 2.0


def config_path() -> Path:
    """config.toml in the working folder, or the file NOODLE_CONFIG names."""
    return Path(os.environ.get("NOODLE_CONFIG", "config.toml"))


class Settings(BaseSettings):
    """All of Noodle's settings: config.toml first, then NOODLE_* environment variables, then DISCORD_TOKEN."""

    model_config = SettingsConfigDict(env_prefix="NOODLE_", env_nested_delimiter="__", extra="ignore")

    models: ModelsSettings = ModelsSettings()
    engine: EngineSettings = EngineSettings()
    limits: Limits = Limits()
    bot: BotSettings = BotSettings()
    discord_token: SecretStr | None = None

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
