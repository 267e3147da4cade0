"""The Studio against the real engine and a real SQLite file: what a request becomes, what is stored and posted."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest
from PIL import Image

from bot.core.storage.params import PARAMS_VERSION
from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from engine.pngmeta import read_png_texts
from tests.bot.conftest import Env


async def test_imagine_posts_pngs_with_their_recipe_and_stores_what_reproduces_them(env: Env) -> None:
    final = await env.run({"prompt": "a red fox in the snow", "negative": "blurry", "seed": 42})
    assert final.kind == "done" and final.error is None
    generation = final.generation
    assert generation.state == "done" and generation.message_id is not None
    stored = await env.store.by_message(generation.message_id)
    assert stored.id == generation.id and stored.requester_id == "42"
    assert stored.channel_id == "555" and stored.guild_id == "777"
    assert stored.seed == 42 and stored.model_hash and stored.tokens and stored.timings["total"] > 0
    assert stored.workflow["3"]["inputs"]["seed"] == 42
    assert stored.workflow["4"]["inputs"]["ckpt_name"] == "tiny-sd15.safetensors"
    texts = read_png_texts(stored.images[0])
    assert '"KSampler"' in texts["prompt"] and "Seed: 42" in texts["parameters"]
    [posted] = env.channel.results()
    assert posted.files[0].data == open(stored.images[0], "rb").read()  # the bytes SaveImage wrote


async def test_each_image_of_a_batch_has_its_own_seed_and_comes_back_alone(env: Env) -> None:
    batch = (await env.run({"prompt": "a lighthouse", "seed": 7, "batch": 2})).generation
    assert [job.seed for job in batch.jobs] == [7, 8] and len(batch.images) == 2
    alone = (await env.run({"prompt": "a lighthouse", "seed": 8})).generation
    second = np.asarray(Image.open(batch.images[1]), dtype=np.int16)
    again = np.asarray(Image.open(alone.images[0]), dtype=np.int16)
    assert np.abs(second - again).max() <= 1  # batched or not, seed 8 gives the same picture


async def test_reroll_runs_the_same_graph_with_a_new_seed_and_reports_the_cached_nodes(env: Env) -> None:
    first = (await env.run({"prompt": "a cabin in the woods", "seed": 1})).generation
    ticket = await env.studio.generations.reroll(first.id, Requester("99", "777"))
    reroll = (await env.finish(ticket)).generation
    assert reroll.kind == "reroll" and reroll.parent_id == first.id and reroll.requester_id == "99"
    assert reroll.seed != first.seed
    changed = {node for node in first.workflow if first.workflow[node] != reroll.workflow[node]}
    assert changed == {"3", "9"}  # the KSampler's seed, and SaveImage's file name (each image has its own)
    assert first.workflow["3"]["inputs"]["seed"] != reroll.workflow["3"]["inputs"]["seed"]
    assert {"4", "6", "7"} <= set(reroll.cached)
    assert f"Model hash: {first.model_hash}" in read_png_texts(reroll.images[0])["parameters"]


async def test_a_row_stored_with_the_old_extra_field_still_rerolls(env: Env) -> None:
    first = (await env.run({"prompt": "a cabin in the woods", "seed": 1})).generation
    with sqlite3.connect(env.store.path) as db:  # what every row written before params had a version holds
        db.execute("UPDATE generations SET params_json = json_remove(json_set(params_json, '$.extra', json('{}')), "
                   "'$.version') WHERE id = ?", (first.id,))
    assert (await env.store.get(first.id)).params["extra"] == {}
    reroll = (await env.finish(await env.studio.generations.reroll(first.id, Requester("99", "777")))).generation
    assert reroll.state == "done" and reroll.parent_id == first.id and "extra" not in reroll.params
    assert reroll.params["version"] == PARAMS_VERSION


async def test_a_stored_row_that_no_longer_fits_the_params_is_refused_naming_what_is_wrong(env: Env) -> None:
    first = (await env.run({"prompt": "a cabin in the woods", "seed": 1})).generation
    with sqlite3.connect(env.store.path) as db:  # a field renamed without a migration step
        db.execute("UPDATE generations SET params_json = json_remove(json_set(params_json, '$.cfg_scale', 7), "
                   "'$.cfg') WHERE id = ?", (first.id,))
    with pytest.raises(RequestInvalid, match=r"#\d+ was stored in a form .* cfg_scale, which WorkflowParams has no"):
        await env.studio.generations.reroll(first.id, Requester("99", "777"))


async def test_variation_is_img2img_of_that_image_at_the_configured_denoise(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, "batch": 2})).generation
    ticket = await env.studio.generations.variation(first.id, Requester("42", "777"), image=2)
    variation = (await env.finish(ticket)).generation
    workflow = variation.workflow
    assert workflow["12"]["class_type"] == "LoadImage" and workflow["13"]["class_type"] == "VAEEncode"
    assert workflow["3"]["inputs"]["denoise"] == env.settings.bot.variation_denoise
    source = env.settings.engine.input_dir / workflow["12"]["inputs"]["image"]
    assert source.read_bytes() == open(first.images[1], "rb").read()
    assert variation.request["variation_of_image"] == 2 and len(variation.images) == 1


def _snapshot(env: Env) -> tuple[list[str], list[str]]:
    files = sorted(p.name for p in env.settings.engine.input_dir.rglob("*") if p.is_file())
    return files, [info.job_id for info in env.engine.jobs()]


async def _refused(env: Env, options: dict, image: bytes | None = None) -> str:
    """Submit options that must be refused; assert that nothing changed and return the message."""
    from bot.core.requests.imagine import ImageUpload
    from engine.errors import NoodleError

    before, rows = _snapshot(env), await env.store.recent()
    if image is not None:
        options = {**options, "image": ImageUpload(filename="in.png", content_type="image/png", data=image)}
    try:
        await env.studio.generations.submit(await env.studio.generations.parse({"prompt": "a fox", **options}), Requester("42"))
    except NoodleError as err:
        message = str(err)
    else:
        raise AssertionError(f"{options} was accepted")
    assert _snapshot(env) == before and await env.store.recent() == rows
    return message


def _png(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 20)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_bad_input_gets_a_clear_message_and_changes_nothing(env: Env) -> None:
    limits = env.settings.limits
    assert "is a GIF file; Noodle decodes only PNG, JPEG or WebP" in await _refused(env, {}, image=b"GIF89a text")
    assert "limit is" in await _refused(env, {}, image=b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024))
    too_big = await _refused(env, {}, image=_png(limits.max_side + 8, 64))
    assert "scale it down" in too_big and str(limits.max_side) in too_big
    long_prompt = await _refused(env, {"prompt": "fox " * (limits.max_prompt_chars // 4 + 1)})
    assert f"the limit is {limits.max_prompt_chars}" in long_prompt
    assert "closest: 'tiny-sd15.safetensors'" in await _refused(env, {"model": "tiny-sd16"})
    unknown_lora = await _refused(env, {"loras": "tiny-lora-x:0.8"})
    assert "LoRA 'tiny-lora-x' is not in models/loras; closest:" in unknown_lora and "'tiny-lora-a" in unknown_lora
    assert "closest" in await _refused(env, {"prompt": "a fox <lora:tiny-lora-z:0.5>"})
    odd = await _refused(env, {"width": 100, "height": 64})
    assert "not a multiple of 8" in odd and "use 96 or 104" in odd
    assert "width 4096 is above this server's limit of 2048" in await _refused(env, {"width": 4096})
    assert "width 32 is below this server's minimum of 64 (bot.min_side" in await _refused(env, {"width": 32})
    assert "keeps the image's size" in await _refused(env, {"width": 64}, image=_png(64, 64))


async def test_a_batch_needs_a_queue_place_per_image(env: Env) -> None:
    env.studio.queue.per_user_max = 3
    assert "needs 4 place(s)" in await _refused(env, {"batch": 4})


async def test_only_the_requester_or_a_moderator_deletes_a_result(env: Env) -> None:
    from bot.core.errors import NotAllowed

    result = (await env.run({"prompt": "a kite", "seed": 5})).generation
    try:
        await env.studio.generations.delete(result.id, Requester("13", "777"))
    except NotAllowed as err:
        assert "Manage Messages" in str(err)
    else:
        raise AssertionError("a stranger deleted someone's result")
    assert all(os.path.exists(p) for p in result.images)
    deleted = await env.studio.generations.delete(result.id, Requester("13", "777", can_manage_messages=True))
    assert deleted.id == result.id
    assert (await env.store.get(result.id)).state == "deleted"
    assert not any(os.path.exists(p) for p in result.images)


async def test_details_hold_the_parameters_text_and_the_workflow(env: Env) -> None:
    import json

    result = (await env.run({"prompt": "a bridge at dusk", "seed": 11, "batch": 2})).generation
    details = await env.studio.generations.details(result.id, Requester("77", "777"))  # a member of the result's server
    assert "Seed: 11" in details.text
    assert "A1111 parameters" in details.text and "#2 12" in details.text
    assert json.loads(details.workflow_json) == result.workflow
