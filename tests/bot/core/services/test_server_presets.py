"""Server presets on a real SQLite file with the real Studio and engine: permissions, validation, layering,
presets broken by a removed model file."""

from __future__ import annotations

import asyncio
import io
import secrets
import shutil
from typing import Any

import pytest

from bot.discord_app.cogs.imagine import imagine_cog
from bot.discord_app.cogs.presets import presets_cog
from bot.discord_app.cogs.user_settings import settings_cog
from bot.console.app import Console, ConsolePublisher, LineReader
from bot.discord_app.client import command_payloads
from bot.core.requests.imagine import Allowed
from bot.settings import Settings
from prompts.styles import load_styles
from tests.bot.fakes import FakeInteraction

from bot.core.cards.result import result_card
from bot.core.errors import NotAllowed, RequestInvalid
from bot.core.presets import Preset, layered
from bot.core.front_end import Requester
from engine.errors import ModelNotFound
from engine.models.hashes import sha256_prefix
from tests.bot.conftest import WAIT, Env

MANAGER = Requester("1", "777", "manager", manage_server=True)
MEMBER = Requester("2", "777", "member")
TINY = {"steps": 4, "width": 64, "height": 64}


def anime(**changes: object) -> Preset:
    return Preset(**{"name": "anime", "model": "tiny-sd15", "loras": "tiny-lora-a:0.8:0.5", "style": "anime",
                     "negative": "blurry", "steps": 5, "cfg": 6.5, "sampler": "euler", "scheduler": "karras",
                     "width": 64, "height": 64, "clip_skip": 2, **changes})


async def test_manager_creates_updates_sets_default_and_deletes(env: Env) -> None:
    created = await env.studio.presets.create(MANAGER, anime(vae="tiny-vae"))
    assert created.preset.model == "tiny-sd15.safetensors"  # names resolved to the files when saved
    assert created.preset.loras == "tiny-lora-a.safetensors:0.8:0.5"
    assert created.preset.vae == "tiny-vae.safetensors"
    assert (created.created_by, created.updated_by) == ("1", "1") and created.created_at > 0
    other = Requester("3", "777", "other manager", manage_server=True)
    updated = await env.studio.presets.update(other, Preset(name="anime", steps=8))
    assert updated.preset.steps == 8 and updated.preset.cfg == 6.5  # options not given stay
    assert (updated.created_by, updated.updated_by) == ("1", "3") and updated.updated_at >= created.updated_at
    assert await env.studio.presets.set_default(MANAGER, "anime") == "anime"
    assert await env.studio.presets.default("777") == "anime"
    shown = await env.studio.presets.show("777", "anime")
    assert shown.preset.steps == 8 and not shown.broken
    await env.restart()  # stored in SQLite, not in memory
    assert [r.preset.name for r in await env.studio.presets.of_server("777")] == ["anime"]
    await env.studio.presets.delete(MANAGER, "anime")
    assert await env.studio.presets.of_server("777") == []
    assert await env.studio.presets.default("777") is None  # the default went with it


async def test_changes_are_refused_without_manage_server(env: Env) -> None:
    with pytest.raises(NotAllowed, match="/preset create needs the Manage Server permission"):
        await env.studio.presets.create(MEMBER, anime())
    await env.studio.presets.create(MANAGER, anime())
    for attempt, command in ((env.studio.presets.update(MEMBER, Preset(name="anime", steps=9)), "update"),
                             (env.studio.presets.delete(MEMBER, "anime"), "delete"),
                             (env.studio.presets.set_default(MEMBER, "anime"), "default")):
        with pytest.raises(NotAllowed, match=f"/preset {command} needs the Manage Server permission"):
            await attempt
    with pytest.raises(NotAllowed, match="works in a server only"):
        await env.studio.presets.create(Requester("1", None, manage_server=True), anime(name="dm"))
    record = await env.studio.presets.show("777", "anime")  # reading needs no permission; nothing changed
    assert record.preset.steps == 5 and record.updated_by == "1"


async def test_saving_checks_the_models_folder_styles_and_limits(env: Env) -> None:
    with pytest.raises(ModelNotFound, match="tiny-sd15"):  # the closest names are offered
        await env.studio.presets.create(MANAGER, anime(model="tiny-sd51"))
    with pytest.raises(ModelNotFound, match="tiny-lora-a"):
        await env.studio.presets.create(MANAGER, anime(loras="tiny-lora-x:0.5"))
    with pytest.raises(ModelNotFound, match="VAE"):
        await env.studio.presets.create(MANAGER, anime(vae="no-such-vae"))
    with pytest.raises(RequestInvalid, match="style 'anmie' is not in prompts/styles.toml; closest: anime"):
        await env.studio.presets.create(MANAGER, anime(style="anmie"))
    with pytest.raises(RequestInvalid, match="steps 100000 is outside"):
        await env.studio.presets.create(MANAGER, anime(steps=100_000))
    with pytest.raises(RequestInvalid, match="preset name 'Bad Name!' is not allowed"):
        await env.studio.presets.create(MANAGER, anime(name="Bad Name!"))
    await env.studio.presets.create(MANAGER, anime())
    with pytest.raises(RequestInvalid, match="already exists; change it with /preset update anime"):
        await env.studio.presets.create(MANAGER, anime())
    with pytest.raises(RequestInvalid, match="there is no preset 'nope' in this server; presets here: anime"):
        await env.studio.presets.update(MANAGER, Preset(name="nope", steps=3))
    assert [r.preset.name for r in await env.studio.presets.of_server("777")] == ["anime"]


def test_layering_later_layers_win() -> None:
    server = {"model": "a", "steps": 10, "cfg": 5.0, "negative": "server", "width": 512}
    user = {"steps": 20, "cfg": 6.0, "negative": "user"}
    preset = {"cfg": 7.0, "negative": "preset", "sampler": "dpmpp_2m"}
    explicit = {"negative": "explicit", "sampler": None}  # None is "not given": it never overrides
    assert layered(server, user, preset, explicit) == {
        "model": "a", "steps": 20, "cfg": 7.0, "negative": "explicit", "width": 512, "sampler": "dpmpp_2m"}
    assert layered(None, None, None, {"steps": 3}) == {"steps": 3}


async def test_imagine_layers_server_default_user_settings_preset_and_explicit(env: Env) -> None:
    await env.studio.presets.create(MANAGER, Preset(name="house", model="tiny-sd15", steps=3, cfg=4.0,
                                                   negative="house", width=64))
    await env.studio.presets.create(MANAGER, Preset(name="chosen", cfg=5.0, negative="chosen", sampler="euler"))
    await env.studio.presets.set_default(MANAGER, "house")
    await env.studio.user_defaults.change(MEMBER, {"steps": 4, "negative": "mine", "height": 64})
    options = await env.studio.presets.layered_options({"prompt": "a fox", "preset": "chosen", "negative": "explicit"},
                                               MEMBER)
    assert options == {"prompt": "a fox", "model": "tiny-sd15.safetensors", "steps": 4, "cfg": 5.0,
                       "negative": "explicit", "sampler": "euler", "width": 64, "height": 64, "preset": "chosen"}
    without = await env.studio.presets.layered_options({"prompt": "a fox"}, MEMBER)
    assert without["preset"] == "house" and without["negative"] == "mine" and without["cfg"] == 4.0


async def test_imagine_with_a_preset_generates_and_the_result_names_it(env: Env) -> None:
    await env.studio.presets.create(MANAGER, anime(steps=3))
    options = await env.studio.presets.layered_options({"prompt": "a fox", "preset": "anime"}, MEMBER)
    final = await env.run(options, MEMBER)
    assert final.kind == "done" and final.generation is not None
    params = final.generation.params
    assert params["steps"] == 3 and params["scheduler"] == "karras" and params["clip_skip"] == -2
    assert "anime" in params["prompt"].lower() and "a fox" in params["prompt"]  # the style was applied
    assert params["loras"][0]["name"] == "tiny-lora-a.safetensors"
    fields = dict(result_card(final.generation).fields)
    assert fields["Preset"] == "anime" and fields["Style"] == "anime"


async def test_a_preset_whose_model_was_removed_is_broken_and_nothing_else(env: Env) -> None:
    folder = env.settings.models.dir / "checkpoints"
    doomed = f"doomed-{secrets.token_hex(4)}.safetensors"
    shutil.copyfile(folder / "tiny-sd15.safetensors", folder / doomed)
    try:
        await env.studio.presets.create(MANAGER, Preset(name="doomed", model=doomed, steps=3))
        await env.studio.presets.create(MANAGER, Preset(name="fine", model="tiny-sd15", steps=3))
    finally:
        (folder / doomed).unlink()
    with pytest.raises(RequestInvalid, match=f"preset 'doomed' is broken: models/checkpoints/{doomed} is no longer"):
        await env.studio.presets.layered_options({"prompt": "a fox", "preset": "doomed"}, MEMBER)
    listed = {r.preset.name: r.broken for r in await env.studio.presets.of_server("777")}
    assert listed == {"doomed": (f"models/checkpoints/{doomed}",), "fine": ()}
    fine = await env.run(await env.studio.presets.layered_options({"prompt": "a fox", "preset": "fine"}, MEMBER), MEMBER)
    plain = await env.run(await env.studio.presets.layered_options({"prompt": "a fox"}, MEMBER), MEMBER)
    assert fine.kind == "done" and plain.kind == "done"
    await env.studio.presets.delete(MANAGER, "doomed")  # a broken preset can still be deleted
    assert [r.preset.name for r in await env.studio.presets.of_server("777")] == ["fine"]


async def test_a_broken_server_default_is_left_out_with_a_note_but_a_chosen_one_fails(env: Env) -> None:
    folder = env.settings.models.dir / "checkpoints"
    doomed = f"doomed-{secrets.token_hex(4)}.safetensors"
    shutil.copyfile(folder / "tiny-sd15.safetensors", folder / doomed)
    try:
        await env.studio.presets.create(MANAGER, Preset(name="house", model=doomed, steps=3, negative="house style"))
        await env.studio.presets.set_default(MANAGER, "house")
    finally:
        (folder / doomed).unlink()
    options = await env.studio.presets.layered_options({"prompt": "a fox"}, MEMBER)
    assert "negative" not in options and "preset" not in options  # nothing of the broken default is used
    [note] = options["notes"]
    assert note.startswith("the server's default preset 'house' is broken") and "made without it" in note
    final = await env.run(options, MEMBER)
    assert final.kind == "done"
    fields = dict(result_card(final.generation).fields)
    assert "'house' is broken" in fields["⚠️ Note"] and "Preset" not in fields
    # chosen, explicitly or through /settings: it fails, naming it
    with pytest.raises(RequestInvalid, match="preset 'house' is broken"):
        await env.studio.presets.layered_options({"prompt": "a fox", "preset": "house"}, MEMBER)
    await env.studio.user_defaults.change(MEMBER, {"preset": "house"})
    with pytest.raises(RequestInvalid, match="preset 'house' is broken"):
        await env.studio.presets.layered_options({"prompt": "a fox"}, MEMBER)


def _cog(env: Env) -> Any:
    return presets_cog(env.studio, Allowed.from_settings(env.settings), tuple(load_styles()))


async def test_the_preset_commands_check_manage_server_in_our_code(env: Env) -> None:
    cog = _cog(env)
    member = FakeInteraction(user_id=2)  # Discord let the command through; we still refuse the change
    await cog.create.callback(cog, member, name="anime", model="tiny-sd15", steps=5)
    assert member.response.calls == [("defer", {"ephemeral": True, "thinking": True})]
    assert member.edits == ["❌ /preset create needs the Manage Server permission; ask a server manager to do it, "
                            "or use /imagine with your own options (or /preset list to see what exists)"]
    manager = FakeInteraction(user_id=1, manage_guild=True)
    await cog.create.callback(cog, manager, name="anime", model="tiny-sd15", style="anime", steps=5)
    assert manager.edits[-1].startswith("✅ Saved preset **anime: model=tiny-sd15.safetensors, style=anime, steps=5**")
    await cog.update.callback(cog, manager, name="anime", cfg=6.0)
    assert "cfg=6.0" in manager.edits[-1]
    await cog.default.callback(cog, manager, name="anime")
    assert manager.edits[-1] == "⭐ Default preset: anime"
    listing = FakeInteraction(user_id=2)
    await cog.list_.callback(cog, listing)
    assert "**anime:" in listing.edits[-1] and "⭐ default" in listing.edits[-1] and "<@1>" in listing.edits[-1]
    await cog.show.callback(cog, listing, name="anime")
    assert "made by <@1>" in listing.edits[-1]
    await cog.delete.callback(cog, member, name="anime")
    assert "needs the Manage Server permission" in member.edits[-1]
    await cog.delete.callback(cog, manager, name="anime")
    assert manager.edits[-1] == "🗑️ Deleted preset anime"


async def test_imagine_preset_option_applies_it_and_names_it_in_the_result(env: Env) -> None:
    await env.studio.presets.create(MANAGER, Preset(name="quick", model="tiny-sd15", steps=3, width=64, height=64))
    cog = imagine_cog(env.studio, Allowed.from_settings(env.settings), status_every=0.5)
    await cog.imagine.callback(cog, FakeInteraction(user_id=2), prompt="a fox", preset="quick", cfg=5.0)
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    [message] = env.channel.results()
    fields = {f.name: f.value for f in message.embed.fields}
    assert fields["Preset"] == "quick" and fields["Steps · CFG · Sampler"].startswith("3 · 5 · ")
    broken = FakeInteraction(user_id=2)
    await cog.imagine.callback(cog, broken, prompt="a fox", preset="nope")
    assert broken.edits == ["❌ there is no preset 'nope' in this server; presets here: quick (a server manager "
                            "makes them with /preset create)"]


async def test_the_preset_group_schema_is_typed_with_config_ranges() -> None:
    payloads = {c["name"]: c for c in await command_payloads(Settings())}
    group = payloads["preset"]
    assert group["type"] == 1 and group.get("dm_permission") is False
    subs = {o["name"]: o for o in group["options"]}
    assert list(subs) == ["create", "update", "delete", "default", "list", "show"]
    assert all(o["type"] == 1 for o in subs.values())
    create = {o["name"]: o for o in subs["create"]["options"]}
    assert list(create) == ["name", "model", "loras", "vae", "style", "negative", "steps", "cfg", "sampler",
                            "scheduler", "width", "height", "clip_skip"]
    assert [n for n, o in create.items() if o["required"]] == ["name"]
    assert (create["steps"]["min_value"], create["steps"]["max_value"]) == (1, 150)
    assert [c["value"] for c in create["style"]["choices"]] == list(load_styles())
    assert create["model"]["autocomplete"] and create["vae"]["autocomplete"]
    assert {o["name"]: o.get("autocomplete") for o in subs["delete"]["options"]} == {"name": True}
    assert all(len(o["description"]) <= 100 for s in subs.values() for o in [s, *s.get("options", [])])
    imagine = {o["name"]: o for o in payloads["imagine"]["options"]}
    assert imagine["preset"]["autocomplete"] and not imagine["preset"]["required"]


async def _chat(env: Env, lines: list[str], *, manage_server: bool) -> tuple[int, str]:
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, manage_server=manage_server)
    code = await console.run(LineReader(io.StringIO("\n".join(lines))))
    return code, out.getvalue()


async def test_the_console_has_the_preset_commands_and_manage_server_flag(env: Env) -> None:
    code, out = await _chat(env, ["/preset create name: quick model: tiny-sd15 steps: 3 width: 64 height: 64"],
                            manage_server=False)
    assert code == 1 and "error: /preset create needs the Manage Server permission" in out
    code, out = await _chat(env, [
        "/preset create name: quick model: tiny-sd15 steps: 3 width: 64 height: 64 style: anime",
        "/preset update name: quick cfg: 5",
        "/preset default name: quick",
        "/preset show name: quick",
        "/preset list",
        "/imagine prompt: a fox",  # the console server's default preset applies
        "/preset default",
    ], manage_server=True)
    assert code == 0, out
    assert "saved preset quick: model=tiny-sd15.safetensors, style=anime, steps=3, width=64, height=64" in out
    assert "cfg=5.0" in out and "default preset: quick" in out and "⭐ default" in out
    assert "made by console:you" in out and "Preset: quick" in out and "no default preset now" in out
    code, out = await _chat(env, ["/preset list", "/preset create name: x bogus: 1", "/preset frob",
                                  "/imagine prompt: a fox preset: quick steps: 2 width: 64 height: 64"],
                            manage_server=False)
    assert "quick: model=tiny-sd15.safetensors" in out  # a plain member may read and use presets
    assert "error: /preset create needs the Manage Server permission" in out  # refused before checking options
    assert "error: /preset frob is not a preset command" in out
    assert "Preset: quick" in out and "Steps · CFG · Sampler: 2 · 5 · " in out


async def test_a_settings_preset_is_the_servers_and_never_stops_an_imagine_elsewhere(env: Env) -> None:
    # presets belong to a server: "anime" chosen in 777 means nothing in 888 (whose own "anime" is another
    # preset) nor in DMs, where a member-wide preset refused every /imagine
    elsewhere, in_dms = Requester("2", "888", "member"), Requester("2", None, "member")
    await env.studio.presets.create(MANAGER, Preset(name="anime", steps=3, cfg=4.0))
    await env.studio.presets.create(Requester("9", "888", "manager", manage_server=True), Preset(name="anime", cfg=9.0))
    assert await env.studio.user_defaults.change(MEMBER, {"preset": "anime", "steps": 6}) == {"preset": "anime",
                                                                                            "steps": 6}
    assert (await env.studio.presets.layered_options({"prompt": "a fox"}, MEMBER))["cfg"] == 4.0
    for who in (elsewhere, in_dms):
        assert await env.studio.user_defaults.get(who) == {"steps": 6}  # the rest follows the member everywhere
        assert await env.studio.presets.layered_options({"prompt": "a fox"}, who) == {"prompt": "a fox", "steps": 6}
    with pytest.raises(RequestInvalid, match="presets belong to a server"):
        await env.studio.user_defaults.change(in_dms, {"preset": "anime"})
    # a row from before presets were kept per server: used where a preset of its name exists, cleared per server
    await env.store.put_setting("user", "3", "defaults", {"preset": "anime", "width": 64})
    old, old_elsewhere = Requester("3", "777", "old"), Requester("3", "999", "old")
    assert await env.studio.user_defaults.get(old) == {"preset": "anime", "width": 64}
    assert await env.studio.user_defaults.get(old_elsewhere) == {"width": 64}
    assert await env.studio.user_defaults.change(old, {"preset": None}) == {"width": 64}


async def test_settings_keep_a_members_defaults_across_restarts(env: Env) -> None:
    await env.studio.presets.create(MANAGER, Preset(name="quick", model="tiny-sd15", steps=3, cfg=5.0))
    cog = settings_cog(env.studio, Allowed.from_settings(env.settings))
    member = FakeInteraction(user_id=2)
    await cog.settings.callback(cog, member, preset="quick", width=64, height=64, negative="blurry")
    assert member.edits[-1] == "✅ your defaults: preset=quick, width=64, height=64, negative=blurry"
    await env.restart()
    cog = settings_cog(env.studio, Allowed.from_settings(env.settings))
    options = await env.studio.presets.layered_options({"prompt": "a fox", "steps": 4}, MEMBER)
    assert options == {"prompt": "a fox", "model": "tiny-sd15.safetensors", "steps": 4, "cfg": 5.0, "width": 64,
                       "height": 64, "negative": "blurry", "preset": "quick"}
    await cog.settings.callback(cog, member, preset="nope")
    assert member.edits[-1].startswith("❌ there is no preset 'nope' in this server")
    await cog.settings.callback(cog, member, width=65)
    assert member.edits[-1].startswith("❌ width 65 is not a multiple of 8")
    await cog.settings.callback(cog, member, clear=True, steps=6)
    assert member.edits[-1] == "✅ your defaults: steps=6"
    code, out = await _chat(env, ["/settings steps: 5 negative: ugly", "/settings", "/settings clear",
                                  "/settings bogus"], manage_server=False)
    assert "your defaults: steps=5, negative=ugly" in out and "no defaults of your own" in out
    assert code == 1 and "error: there is no preset 'bogus'" in out
    settings = {c["name"]: c for c in await command_payloads(Settings())}["settings"]
    kinds = {o["name"]: o["type"] for o in settings["options"]}
    assert kinds == {"preset": 3, "width": 4, "height": 4, "steps": 4, "negative": 3, "private": 5, "clear": 5}


async def test_tokens_reports_chunks_embeddings_and_lora_tags(env: Env) -> None:
    cog = settings_cog(env.studio, Allowed.from_settings(env.settings))
    asked = FakeInteraction(user_id=2)
    await cog.tokens.callback(cog, asked, text="a red fox <lora:tiny-lora-a:0.8> embedding:tiny-embedding")
    assert asked.response.calls == [("defer", {"ephemeral": True, "thinking": True})]
    assert asked.edits[-1].startswith("5/75 tokens (1 chunk: 5)")  # 3 words, 2 embedding vectors
    assert "embeddings: tiny-embedding" in asked.edits[-1] and "LoRA tags: tiny-lora-a" in asked.edits[-1]
    code, out = await _chat(env, ["/tokens " + "word " * 100, "/tokens"], manage_server=False)
    assert "100/150 tokens (2 chunks: 75, 25)" in out
    assert code == 1 and "error: there is no text to count" in out
    schema = {c["name"]: c for c in await command_payloads(Settings())}["tokens"]
    assert [(o["name"], o["type"], o["required"]) for o in schema["options"]] == [("text", 3, True)]


async def test_history_lists_the_callers_own_generations_with_links(env: Env) -> None:
    mine = await env.run({"prompt": "a red fox"}, MEMBER)
    await env.run({"prompt": "someone else's"}, MANAGER)
    assert mine.generation is not None
    cog = settings_cog(env.studio, Allowed.from_settings(env.settings))
    asked = FakeInteraction(user_id=2)
    await cog.history.callback(cog, asked, count=5)
    [line] = asked.edits[-1].splitlines()
    assert line.startswith(f"#{mine.generation.id} imagine · done · ") and "a red fox" in line
    assert f"https://discord.com/channels/777/{env.channel.id}/" in line
    nobody = FakeInteraction(user_id=99)
    await cog.history.callback(cog, nobody, count=5)
    assert nobody.edits[-1] == "No generations yet; try /imagine"
    code, out = await _chat(env, ["/history"], manage_server=False)
    assert code == 0 and "no generations yet" in out  # the console's user is its own requester
    schema = {c["name"]: c for c in await command_payloads(Settings())}["history"]
    assert [(o["name"], o["min_value"], o["max_value"]) for o in schema["options"]] == [("count", 1, 25)]


async def test_models_lists_checkpoints_with_architecture_size_and_hash(env: Env) -> None:
    cog = settings_cog(env.studio, Allowed.from_settings(env.settings))
    asked = FakeInteraction(user_id=2)
    await cog.models.callback(cog, asked)
    text = asked.edits[-1]
    digest = sha256_prefix(env.settings.models.dir / "checkpoints" / "tiny-sd15.safetensors")
    assert text.startswith("Checkpoints:\n")
    assert any(line.startswith("  tiny-sd15.safetensors · tiny-sd15 · ") and line.endswith(f" MB · {digest}")
               for line in text.splitlines())
    assert "  tiny-sdxl.safetensors · tiny-sdxl · " in text
    assert "LoRAs: tiny-lora-a.safetensors, tiny-lora-b.safetensors" in text
    assert "Embeddings: tiny-embedding.safetensors" in text
    code, out = await _chat(env, ["/models"], manage_server=False)
    assert code == 0 and "tiny-sd15.safetensors · tiny-sd15 · " in out
    assert "models" in {c["name"] for c in await command_payloads(Settings())}
