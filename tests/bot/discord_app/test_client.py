"""The application commands exactly as they would be synced (`to_dict`), and `noodle bot --print-commands`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.cli import main
from bot.discord_app.client import command_payloads, intents
from bot.settings import BotSettings, Settings
from engine.samplers import SCHEDULER_NAMES, SUPPORTED_SAMPLERS


def _options(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {option["name"]: option for option in payload["options"]}


async def test_imagine_has_every_option_typed_with_config_ranges_and_choices() -> None:
    imagine = next(c for c in await command_payloads(Settings()) if c["name"] == "imagine")
    assert imagine["name"] == "imagine" and imagine["type"] == 1 and imagine["description"]
    options = _options(imagine)
    assert list(options) == ["prompt", "preset", "negative", "model", "loras", "steps", "cfg", "sampler", "scheduler",
                             "seed",
                             "width", "height", "batch", "image", "denoise", "control_image", "controlnet",
                             "control_strength", "control_canny", "clip_skip", "private"]
    assert [name for name, o in options.items() if o["required"]] == ["prompt"]
    kinds = {name: o["type"] for name, o in options.items()}
    assert kinds == {"prompt": 3, "preset": 3, "negative": 3, "model": 3, "loras": 3, "steps": 4, "cfg": 10,
                     "sampler": 3,
                     "scheduler": 3, "seed": 4, "width": 4, "height": 4, "batch": 4, "image": 11, "denoise": 10,
                     "control_image": 11, "controlnet": 3, "control_strength": 10, "control_canny": 5,
                     "clip_skip": 4, "private": 5}
    assert (options["prompt"]["min_length"], options["prompt"]["max_length"]) == (1, 4000)
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (1, 150)
    assert (options["cfg"]["min_value"], options["cfg"]["max_value"]) == (0.0, 30.0)
    assert (options["width"]["min_value"], options["width"]["max_value"]) == (64, 2048)
    assert (options["batch"]["min_value"], options["batch"]["max_value"]) == (1, 4)
    assert (options["denoise"]["min_value"], options["denoise"]["max_value"]) == (0.01, 1.0)
    assert options["seed"]["max_value"] == 2**53 - 1  # Discord's integers are doubles
    # ComfyUI's 42 samplers are more than Discord's 25 fixed choices: the sampler is suggested as it is typed
    assert options["sampler"]["autocomplete"] and "choices" not in options["sampler"]
    assert [c["value"] for c in options["scheduler"]["choices"]] == list(SCHEDULER_NAMES)
    assert options["model"]["autocomplete"] and options["loras"]["autocomplete"]
    assert options["controlnet"]["autocomplete"]
    assert (options["control_strength"]["min_value"], options["control_strength"]["max_value"]) == (0.0, 2.0)
    assert options["preset"]["autocomplete"]
    assert all(len(o["description"]) <= 100 for o in options.values())


async def test_ranges_follow_config_toml() -> None:
    settings = Settings(bot=BotSettings(max_batch=2, max_cfg=12.0, min_side=256))
    settings = settings.model_copy(update={"limits": settings.limits.model_copy(
        update={"max_steps": 50, "max_side": 1024, "max_prompt_chars": 1000})})
    options = _options((await command_payloads(settings))[0])
    assert options["steps"]["max_value"] == 50 and options["batch"]["max_value"] == 2
    assert options["cfg"]["max_value"] == 12.0 and options["prompt"]["max_length"] == 1000
    assert (options["height"]["min_value"], options["height"]["max_value"]) == (256, 1024)


def test_only_non_privileged_intents() -> None:
    chosen = intents()
    assert chosen.guilds and chosen.guild_reactions and chosen.dm_reactions
    assert not (chosen.members or chosen.presences or chosen.message_content)


async def test_print_commands_prints_the_sync_payload_without_connecting(capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    expected = await command_payloads(Settings())
    monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token-and-never-used")
    import asyncio

    code = await asyncio.to_thread(main, ["bot", "--print-commands"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out) == expected
    assert "not-a-real-token" not in out


async def test_the_client_wires_store_engine_studio_and_cogs_and_syncs_only_on_change(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.discord_app.client import NoodleBot

    synced: list[int] = []

    async def sync(*, guild: object = None) -> list[object]:  # the Discord edge: the HTTP call of tree.sync
        synced.append(1)
        return []

    for start in range(2):
        bot = NoodleBot(settings)
        monkeypatch.setattr(bot.tree, "sync", sync)
        await bot.setup_hook()
        try:
            assert set(bot.cogs) == {"Imagine", "Presets", "UserSettings", "Queue", "Workflow", "Moderation",
                                      "Reactions", "ResultButtons"}
            assert bot.studio.front == "discord"
            assert [c.name for c in bot.tree.get_commands()] == ["imagine", "preset", "settings", "tokens", "history",
                                                                 "models", "queue", "workflow", "rules", "mod"]
        finally:
            await bot.close()
    assert synced == [1]  # the second start found the same schema already synced


def test_noodle_bot_without_a_token_says_how_to_get_one(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["bot"]) == 2
    assert "DISCORD_TOKEN is not set" in capsys.readouterr().out


def test_bench_bot_sits_beside_the_engine_benches() -> None:
    from bot.cli import build_parser

    parser = build_parser(Settings())
    args = parser.parse_args(["bench", "bot", "--commands", "7"])
    assert (args.what, args.commands) == ("bot", 7)
    assert parser.parse_args(["bench", "engine"]).what == "engine"


def test_sampler_suggestions_reach_every_comfyui_sampler() -> None:
    from bot.discord_app.cogs.interaction import matching_choices

    assert [c.value for c in matching_choices(SUPPORTED_SAMPLERS, "uni")] == ["uni_pc", "uni_pc_bh2"]
    sde = [c.value for c in matching_choices(SUPPORTED_SAMPLERS, "SDE")]
    assert "dpmpp_3m_sde_gpu" in sde and "er_sde" in sde and sde.index("dpmpp_sde") < sde.index("er_sde")
    assert matching_choices(SUPPORTED_SAMPLERS, "er")[0].value == "er_sde"  # a name starting so comes first
    assert len(matching_choices(SUPPORTED_SAMPLERS, "")) == 25
    every = {c.value for typed in SUPPORTED_SAMPLERS for c in matching_choices(SUPPORTED_SAMPLERS, typed)[:1]}
    assert every == set(SUPPORTED_SAMPLERS)  # typing a name suggests it first


def test_with_ray_workers_the_bot_process_validates_on_the_cpu_without_memory_reuse() -> None:
    """Its executor only validates: no CUDA context, and no malloc tuning for sampler steps it never runs (the
    same rule as engine.heap.reuse_for at start-up)."""
    from engine.heap import reuse_for
    from engine.settings import EngineSettings

    here = Settings(engine=EngineSettings(workers="ray", device="auto")).engine_here()
    assert (here.device, here.reuse_cpu_memory, here.workers) == ("cpu", False, "ray")
    assert reuse_for(here) is False
    local = Settings(engine=EngineSettings(device="cpu"))
    assert local.engine_here() is local.engine and local.engine.reuse_cpu_memory
