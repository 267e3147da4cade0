"""/workflow on a real SQLite file with the real Studio and engine on the tiny models: an uploaded ComfyUI
API-format workflow is checked, run as one job, stored with all its images, posted, rerolled and deleted;
refusals say why, per node, and leave nothing behind."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from bot.discord_app.cogs.reactions import Reactions
from bot.discord_app.cogs.workflow import Workflow
from bot.console.app import Console, ConsolePublisher, LineReader
from bot.discord_app.client import command_payloads
from bot.core.errors import RequestInvalid
from bot.settings import Settings
from bot.core.storage.schema import MIGRATIONS, migrate
from bot.core.storage.store import Store
from bot.core.front_end import Origin, Requester
from bot.core.requests.imagine import ImageUpload
from bot.core.requests.workflow_file import LINE_CHARS, SHOWN_NODES, reseed, summarise
from engine.errors import WorkflowInvalid
from engine.queue import JobState
from tests.bot.conftest import WAIT, Env
from tests.bot.fakes import FakeAttachment, FakeInteraction, reaction
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import GATE_SEED, Gate
from tests.engine.test_validate_outputs import random_workflows
from tests.engine.validate_support import run as validate_with_fake_nodes

ALICE = Requester("42", "777", "alice")


def graph(**overrides: Any) -> dict[str, Any]:
    """The template's txt2img graph on tiny SD1.5 as ComfyUI would export it, plus a PreviewImage of the same
    images: batch 2 gives four images from one job."""
    workflow = txt2img(**{"seed": 5, "batch_size": 2, "filename_prefix": "ComfyUI", **overrides})
    workflow["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    return workflow


def as_file(workflow: Any) -> bytes:
    return json.dumps(workflow, indent=2).encode()


async def run(env: Env, data: bytes, filename: str = "graph.json", who: Requester = ALICE) -> Any:
    ticket = await env.studio.workflows.run(data, filename, who, Origin(str(env.channel.id), "777"))
    return await env.finish(ticket)


def _snapshot(env: Env) -> tuple[set[str], list[str]]:
    output = env.settings.engine.output_dir
    return {str(p) for p in output.rglob("*") if p.is_file()}, \
        [info.job_id for info in env.engine.jobs(states=tuple(JobState))]


async def refused(env: Env, data: bytes, filename: str = "graph.json") -> str:
    """Upload something that must be refused; assert that no row, file or job was left and return the message."""
    before, rows = _snapshot(env), await env.store.recent()
    with pytest.raises(RequestInvalid) as caught:
        await env.studio.workflows.run(data, filename, ALICE, Origin("555", "777"))
    assert _snapshot(env) == before and await env.store.recent() == rows
    return str(caught.value)


async def test_a_workflow_runs_as_one_job_and_every_image_is_stored_and_posted(env: Env) -> None:
    final = await run(env, as_file(graph()))
    assert final.kind == "done" and final.error is None
    generation = final.generation
    assert generation.kind == "workflow" and len(generation.jobs) == 1
    assert generation.request == {"filename": "graph.json", "bytes": len(as_file(graph()))}
    assert len(generation.images) == 4 and len(set(generation.images)) == 4  # 2 saved + 2 previewed
    results = (env.settings.engine.output_dir / env.settings.bot.results_folder).resolve()
    for path in generation.images:
        assert Path(path).is_file() and results in Path(path).parents
        assert '"KSampler"' in Image.open(path).text["prompt"]
    stored = generation.workflow
    assert stored["20"]["class_type"] == "SaveImage"  # posted and kept like any result
    assert stored["9"]["inputs"]["filename_prefix"].startswith(f"{env.settings.bot.results_folder}/")
    assert generation.model_name == "tiny-sd15.safetensors" and generation.model_hash
    assert generation.params["seeds"] == {"3": 5} and generation.seed == 5

    [message] = env.channel.results()
    assert message.files[0].filename == f"noodle-{generation.id}-grid.png"  # 2-4 images: a grid, then each PNG
    assert [f.data for f in message.files[1:]] == [open(p, "rb").read() for p in generation.images]
    assert message.reactions == ["🔁", "🗑️", "ℹ️"]  # no 🔀: variations start from /imagine results
    embed = message.embed
    fields = {f.name: f.value for f in embed.fields}
    assert embed.title == "🧩 /workflow" and embed.description == "a red fox in the snow"
    assert fields["Workflow"] == "graph.json · 8 nodes · 4 images"
    assert fields["Checkpoints"] == f"tiny-sd15 ({generation.model_hash})" and fields["Seed"] == "5"
    assert fields["Tokens"] == "prompt 6/75 · negative 1/75"
    assert "🔁 rerun with new seeds" in embed.footer.text and f"#{generation.id}" in embed.footer.text

    await env.restart()  # every path of the job survives in SQLite (schema 3)
    again = await env.store.get(generation.id)
    assert again.images == generation.images and (await env.store.schema_version()) == len(MIGRATIONS) >= 3


async def test_an_invalid_workflow_is_summarised_one_line_per_node_and_leaves_nothing(env: Env) -> None:
    broken = graph()
    broken["3"]["inputs"].update(sampler_name="foo", steps=0)
    broken["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    del broken["8"]["inputs"]["vae"]
    message = await refused(env, as_file(broken))
    lines = message.splitlines()
    assert lines[0] == "workflow: 'graph.json' did not pass validation:"
    # ComfyUI leaves a list of 42 samplers out of its body: the summary lists the node's own choices itself
    assert "node 3 (KSampler): steps: value 0 smaller than min of 1; sampler_name: value not in list: 'foo' " \
           "(allowed: euler, euler_cfg_pp, euler_ancestral, " in message and "(42 in all)" in message
    [loader] = [line for line in lines if line.startswith("node 4 ")]
    assert loader.startswith("node 4 (CheckpointLoaderSimple): ckpt_name: value not in list: 'nope.safetensors' "
                             "(allowed: ") and "tiny-sd15.safetensors" in loader
    assert "node 8 (VAEDecode): vae: required input is missing" in lines
    assert len(lines) == 4 and all(len(line) <= 300 for line in lines)
    unknown = graph()
    unknown["30"] = {"class_type": "UltimateSDUpscale", "inputs": {}}
    said = await refused(env, as_file(unknown))
    assert "node UltimateSDUpscale does not exist" in said and "custom node pack" in said, said
    unknown["30"] = {"class_type": "StyleModelLoader", "inputs": {}}
    said = await refused(env, as_file(unknown))
    assert "StyleModelLoader is a ComfyUI built-in node" in said and "`noodle nodes` lists" in said, said


async def test_what_is_no_runnable_workflow_is_refused_with_what_to_do(env: Env) -> None:
    ui = {"last_node_id": 9, "nodes": [{"id": 3, "type": "KSampler"}], "links": [[1, 4, 0, 3, 0, "MODEL"]]}
    assert "is ComfyUI's UI format" in await refused(env, as_file(ui))
    assert "export it with Save (API Format)" in await refused(env, as_file(ui))
    bad = b'{\n  "3": {"class_type": "KSampler",\n    "inputs": {,}\n}'
    assert "is not valid JSON: Expecting property name enclosed in double quotes at line 3, column 16" \
        in await refused(env, bad)
    limit = env.settings.limits.max_workflow_bytes
    big = as_file({**graph(), "_padding": {"class_type": "Note", "inputs": {"text": "x" * limit}}})
    too_big = await refused(env, big, "huge.json")
    assert f"'huge.json' is {len(big) / 1024:,.1f} KiB; the limit is 256.0 KiB" in too_big
    assert "max_workflow_bytes" in too_big
    saver = graph()
    saver["40"] = {"class_type": "CheckpointSave", "inputs": {"model": ["4", 0], "clip": ["4", 1], "vae": ["4", 2],
                                                              "filename_prefix": "checkpoints/mine"}}
    blocked = await refused(env, as_file(saver))
    assert "node 40 (CheckpointSave): it writes a multi-GB checkpoint file" in blocked
    assert "workflow_blocked_nodes" in blocked
    # hundreds of SaveLatent nodes wrote GBs no 🗑️ or retention removes: refused the same way
    hoarder = {**graph(), **{f"5{n}": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                                            "filename_prefix": "latents/x"}}
                             for n in range(3)}}
    assert "node 50 (SaveLatent): it writes a file on the bot's machine" in await refused(env, as_file(hoarder))
    assert "holds a JSON list, not a workflow" in await refused(env, b"[1, 2, 3]")
    assert "is not UTF-8 text" in await refused(env, b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert "Prompt has no outputs" in await refused(env, as_file({"4": graph()["4"]}))


async def test_a_workflow_needs_a_queue_place_like_any_request(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    held = await env.studio.workflows.run(as_file(graph(seed=GATE_SEED, negative="held in the sampler")), "held.json",
                                         ALICE, Origin("555", "777"))
    try:
        await gate.wait_entered()
        env.studio.queue.per_user_max = 1
        assert "needs 1 place(s) in the queue and you have 1 of 1 in use" in await refused(env, as_file(graph()))
    finally:
        gate.open()
    assert (await env.finish(held)).kind == "done"


async def test_reroll_gives_every_sampler_a_new_seed_variation_is_refused_delete_removes_every_file(
        env: Env) -> None:
    # the body of ComfyUI's POST /prompt is taken too
    first = (await run(env, as_file({"prompt": graph(), "client_id": "abc"}), "wrapped.json")).generation
    reroll = (await env.finish(await env.studio.generations.reroll(first.id, Requester("99", "777")))).generation
    assert reroll.kind == "reroll" and reroll.parent_id == first.id and reroll.requester_id == "99"
    new_seed = reroll.workflow["3"]["inputs"]["seed"]
    assert new_seed != 5 and reroll.params["seeds"] == {"3": new_seed} and reroll.params["filename"] == "wrapped.json"
    assert len(reroll.images) == 4 and not set(reroll.images) & set(first.images)
    assert {"4", "6", "7"} <= set(reroll.cached)  # only the sampler and what follows it ran again
    assert Image.open(reroll.images[0]).tobytes() != Image.open(first.images[0]).tobytes()
    assert reroll.workflow["9"]["inputs"]["filename_prefix"] != first.workflow["9"]["inputs"]["filename_prefix"]

    with pytest.raises(RequestInvalid, match=r"came from /workflow: 🔀 variations start from an /imagine result"):
        await env.studio.generations.variation(first.id, ALICE)
    details = await env.studio.generations.details(reroll.id, ALICE)
    assert details.text.startswith(f"🔁 Reroll of #{first.id} · /workflow")
    assert "run it again with /workflow" in details.text
    assert json.loads(details.workflow_json)["3"]["inputs"]["seed"] == new_seed

    await env.studio.generations.delete(first.id, ALICE)
    assert not any(os.path.exists(p) for p in first.images)
    assert all(os.path.exists(p) for p in reroll.images)  # its own files
    assert (await env.store.get(first.id)).images == []


async def test_private_results_go_to_the_requesters_dms(env: Env) -> None:
    await env.studio.user_defaults.change(ALICE, {"private": True})
    final = await run(env, as_file(graph(batch_size=1)))
    assert final.generation.request["private"] is True and env.channel.results() == []
    [message] = env.client.get_user(42).dm_channel.results()
    assert len(message.files) == 3 and message.reactions == ["🔁", "🗑️", "ℹ️"]  # the grid of the two, and each


def test_reseed_changes_constant_seeds_and_leaves_linked_ones() -> None:
    workflow = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}},
                "2": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": 2}},
                "3": {"class_type": "KSampler", "inputs": {"seed": ["9", 0]}},
                "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "seed"}}}
    picks = iter([70, 80])
    fresh, seeds = reseed(workflow, lambda: next(picks))
    assert seeds == {"1": 70, "2": 80}
    assert fresh["1"]["inputs"]["seed"] == 70 and fresh["2"]["inputs"]["noise_seed"] == 80
    assert fresh["3"]["inputs"]["seed"] == ["9", 0] and workflow["1"]["inputs"]["seed"] == 1  # a copy


async def test_the_console_runs_a_workflow_file_and_reacts_to_it(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "fox.json"
    path.write_bytes(as_file(graph(batch_size=1)))
    out = io.StringIO()
    env.studio.results.publisher = ConsolePublisher(out)
    console = Console(env.studio, out, io.StringIO(), interactive=False, details_dir=tmp_path)
    lines = [f"/workflow {path}", "react last 🔀", "react last 🔁", "react last 🗑️", "/workflow /no/such.json",
             "help"]
    code = await console.run(LineReader(io.StringIO("\n".join(lines))))
    text = out.getvalue()
    assert code == 1  # the refused variation and the missing file
    assert "🧩 /workflow" in text and "Workflow: fox.json · 8 nodes · 2 images" in text
    assert "🔁 Reroll of #1 · /workflow" in text
    written = [line.removeprefix("wrote ") for line in text.splitlines() if line.startswith("wrote ")]
    assert len(written) == 4
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "came from /workflow" in errors[0] and "cannot read /no/such.json" in errors[1]
    assert "deleted #2" in text and "/workflow my-graph.json" in text  # help lists it
    assert all(os.path.exists(p) for p in written[:2]) and not any(os.path.exists(p) for p in written[2:])


async def test_the_discord_command_checks_the_size_before_downloading_then_posts_like_imagine(env: Env) -> None:
    cog = Workflow(env.studio, status_every=0.5)
    interaction = FakeInteraction()
    big = FakeAttachment(b"{}", filename="big.json", content_type="application/json", size=300 * 1024)
    await cog.workflow.callback(cog, interaction, file=big)
    assert interaction.response.calls == [("defer", {"ephemeral": True, "thinking": True})]
    assert interaction.edits[-1].startswith("❌ workflow: 'big.json' is 300.0 KiB; the limit is 256.0 KiB")
    assert big.reads == 0 and not await env.store.recent()

    # two SaveImage nodes of six images each: Discord takes ten files a message
    many = graph(batch_size=6)
    many["20"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "more"}}
    upload = FakeAttachment(as_file(many), filename="many.json", content_type="application/json; charset=utf-8")
    interaction = FakeInteraction()
    await cog.workflow.callback(cog, interaction, file=upload)
    assert interaction.edits[0].startswith(("⏳ Queued", "🎨 Starting"))  # queued, or taken by the worker at once
    assert "many.json · tiny-sd15 · seed 5" in interaction.edits[0]
    await asyncio.wait_for(asyncio.gather(*cog._tasks), WAIT)
    [message] = env.channel.results()
    generation = await env.store.by_message(message.id)
    assert len(generation.images) == 12 and len(message.files) == 10
    assert {f.name: f.value for f in message.embed.fields}["Not attached"] == \
        "2 more image(s): Discord takes 10 files a message"
    assert interaction.edits[-1].startswith("✅ Done") and str(message.id) in interaction.edits[-1]

    # 🔀 on it is answered privately with why not; 🗑️ removes all twelve files and the message
    reactions = Reactions(env.client, env.studio, status_every=0.5)
    await reactions.on_raw_reaction_add(reaction(message.id, 42, "🔀"))
    assert "came from /workflow" in env.client.get_user(42).dms[-1][0]
    await reactions.on_raw_reaction_add(reaction(message.id, 42, "🗑️"))
    assert message.deleted and not any(os.path.exists(p) for p in generation.images)


async def test_the_command_is_registered_with_a_required_attachment() -> None:
    payload = next(c for c in await command_payloads(Settings()) if c["name"] == "workflow")
    options = {o["name"]: o for o in payload["options"]}
    assert options["file"]["type"] == 11 and options["file"]["required"]
    assert options["private"]["type"] == 5 and not options["private"].get("required")
    assert len(payload["description"]) <= 100


async def test_rows_from_before_schema_3_keep_their_one_image(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    async with aiosqlite.connect(path) as db:
        await migrate(db, path, MIGRATIONS[:2])
        await db.execute("INSERT INTO generations (id, kind, front, state, requester_id, request_json, params_json, "
                         "model_name, created_at) VALUES (1, 'imagine', 'discord', 'done', '42', '{}', '{}', "
                         "'tiny-sd15.safetensors', 0)")
        await db.execute("INSERT INTO generation_jobs (generation_id, idx, job_id, seed, workflow_json, state, "
                         "image_path) VALUES (1, 1, 'j1', 7, '{}', 'done', '/out/old.png')")
        await db.commit()
    store = await Store.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS)  # every migration ran over the old rows
        old = await store.get(1)
        assert old.images == ["/out/old.png"] and old.image_seeds == [7] and old.safety is None and not old.nsfw_scores
    finally:
        await store.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_workflows())
def test_any_refused_workflow_is_summarised_one_short_line_per_node(workflow: dict[str, Any]) -> None:
    try:
        validate_with_fake_nodes(workflow)
    except WorkflowInvalid as err:
        lines = summarise(err.body, "fuzz.json").splitlines()
        node_errors = err.body["node_errors"]
        assert lines[0].startswith("workflow: 'fuzz.json' ")
        assert len(lines) == 1 + min(len(node_errors), SHOWN_NODES) + (len(node_errors) > SHOWN_NODES)
        assert all(len(line) <= LINE_CHARS for line in lines[1:]) and len(lines[0]) <= 2 * LINE_CHARS + 200
        for node_id in list(node_errors)[:SHOWN_NODES]:
            assert any(line.startswith(f"node {node_id} (") for line in lines)


async def test_a_missing_load_image_never_lists_the_input_folder(env: Env) -> None:
    """The input folder holds other members' uploads: a stranger's workflow must not learn their names."""
    inputs = env.settings.engine.input_dir
    secret = inputs / "someone-elses-upload.png"
    Image.new("RGB", (64, 64)).save(secret)
    try:
        workflow = txt2img(seed=5)
        workflow["10"] = {"class_type": "LoadImage", "inputs": {"image": "guess.png"}}
        workflow["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        workflow["3"]["inputs"]["latent_image"] = ["11", 0]
        message = await refused(env, as_file(workflow))
        assert "'guess.png' is not in Noodle's input folder" in message
        assert "someone-elses-upload" not in message
    finally:
        secret.unlink()


async def test_a_workflow_loads_only_its_requesters_own_uploads_and_the_owners_input_images(env: Env) -> None:
    """An /imagine attachment is seen by its sender alone, yet ℹ️ and the PNG name it (by its content): a stranger's
    LoadImage -> SaveImage of that name would post it. The sender may load it; the owner's input images load."""
    bob = Requester("66", "777", "bob")
    picture = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(picture, format="PNG")
    upload = ImageUpload(filename="mine.png", content_type="image/png", data=picture.getvalue())
    made = await env.finish(await env.studio.generations.submit(await env.studio.generations.parse(
        {"prompt": "a wall", "steps": 2, "image": upload, "denoise": 0.9}), bob, Origin("555", "777")))
    name = made.generation.params["init_image"]
    folder = env.settings.bot.uploads_folder
    assert name.startswith(f"{folder}/") and (env.settings.engine.input_dir / name).is_file()

    def loading(image: str) -> bytes:
        return as_file({"1": {"class_type": "LoadImage", "inputs": {"image": image}},
                        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}})

    # alice has the name (ℹ️ shows it; her text may even hold it) but never sent that picture
    await env.run({"prompt": f"{name} {folder}/", "steps": 2}, ALICE)
    for spelt in (name, f"elsewhere/../{name}", name.upper(), name.replace("/", "\\"), folder):
        message = await refused(env, loading(spelt))
        assert "from the bot's uploads ([bot] uploads_folder)" in message and "node 1 (LoadImage)" in message
    for who, image in ((bob, name), (ALICE, "owners-texture.png")):
        Image.new("RGB", (64, 64), "teal").save(env.settings.engine.input_dir / "owners-texture.png")
        done = await env.finish(await env.studio.workflows.run(loading(image), "g.json", who, Origin("555", "777")))
        assert done.kind == "done" and len(done.generation.images) == 1
    (env.settings.engine.input_dir / "owners-texture.png").unlink()
