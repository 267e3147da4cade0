"""The actions under a result through the real Studio, engine and SQLite file: U1-U4 upscale on the model and the
latent path, vary subtle/strong, zoom out and pan, remix; who owns the new job, privacy, refusals."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from PIL import Image

from bot.core.actions import Action, parse_action
from bot.core.cards.result import result_card
from bot.core.errors import GenerationNotFound, RequestInvalid
from bot.core.front_end import Origin, Requester
from bot.core.services.actions import RemixForm, ResultActions
from bot.core.storage.params import PARAMS_VERSION
from bot.core.storage.records import Generation
from tests.bot.conftest import Env

ALICE, BOB = Requester("42", "777"), Requester("99", "777")
SMALL = {"steps": 2}


def _actions(env: Env, **bot: Any) -> ResultActions:
    """The Studio's actions with [bot] settings changed, as config.toml would."""
    settings = env.settings.model_copy(update={"bot": env.settings.bot.model_copy(update=bot)})
    return ResultActions(env.studio.generations, settings)


async def _done(env: Env, ticket: Any) -> Generation:
    final = await env.finish(ticket)
    assert final.error is None, final.error
    return final.generation


def _size(generation: Generation) -> tuple[int, int]:
    [path] = generation.images
    with Image.open(path) as image:
        return image.size


def _field(generation: Generation, name: str) -> str:
    return dict(result_card(generation).fields)[name]


async def test_u2_of_a_batch_upscales_image_2_with_the_closest_upscaler_then_a_hires_pass(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, "batch": 2, **SMALL}, ALICE)).generation
    upscaled = await _done(env, await env.studio.actions.run(first.id, parse_action(["U2"]), BOB))
    assert upscaled.kind == "upscale" and upscaled.parent_id == first.id and _size(upscaled) == (128, 128)
    workflow = upscaled.workflow
    source = env.settings.engine.input_dir / workflow["12"]["inputs"]["image"]
    assert source.read_bytes() == open(first.images[1], "rb").read()  # image 2, as the button says
    # "" picks the upscaler whose scale is closest to the 2x factor: the x2 one, not the x4 ones
    assert workflow["31"]["inputs"]["model_name"] == "tiny-compact-x2.safetensors"
    sampler = workflow["3"]["inputs"]
    assert sampler["denoise"] == 0.35 and sampler["seed"] == first.image_seeds[1]  # same prompt, seed, model
    assert upscaled.params["prompt"] == first.params["prompt"] and upscaled.model_name == first.model_name
    assert _field(upscaled, "Upscale") == "Upscaled 2× with tiny-compact-x2, then hires fix at denoise 0.35"
    assert result_card(upscaled).title.startswith(f"🔍 Upscale of #{first.id}, image 2")


async def test_the_latent_path_upscales_in_latent_space_at_its_own_denoise(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, "batch": 2, **SMALL}, ALICE)).generation
    upscaled = await _done(env, await _actions(env, upscale_model="latent").upscale(first.id, ALICE, image=2))
    assert _size(upscaled) == (128, 128)
    assert upscaled.workflow["34"]["class_type"] == "LatentUpscale" and "31" not in upscaled.workflow
    assert upscaled.workflow["3"]["inputs"]["denoise"] == 0.55
    assert _field(upscaled, "Upscale") == "Upscaled 2× in latent space, then hires fix at denoise 0.55"
    # an upscaled image offers the edit set: vary it, and its card says how strongly
    varied = await _done(env, await env.studio.actions.run(upscaled.id, parse_action(["vary", "subtle"]), ALICE))
    assert varied.workflow["3"]["inputs"]["denoise"] == 0.35 and _size(varied) == (128, 128)
    assert "Upscale" not in dict(result_card(varied).fields)
    assert _field(varied, "Vary").startswith("Vary (subtle): img2img of image 1")


async def test_vary_strong_and_v_buttons_use_the_strong_denoise(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, **SMALL}, ALICE)).generation
    strong = await _done(env, await env.studio.actions.run(first.id, Action("variation", 1), ALICE))
    assert strong.kind == "variation" and strong.workflow["3"]["inputs"]["denoise"] == 0.7
    assert result_card(strong).title == f"🔀 Variation (strong) of #{first.id}, image 1"
    with pytest.raises(RequestInvalid, match="vary takes subtle or strong, not 'wild'"):
        await env.studio.actions.vary(first.id, ALICE, strength="wild")


@pytest.mark.parametrize(("words", "size", "what"), [
    (["zoom", "2"], (128, 128), "Zoomed out 2×"),
    (["zoom", "1.5"], (96, 96), "Zoomed out 1.5×"),
    (["pan", "left"], (96, 64), "Panned left"),
])
async def test_zoom_and_pan_grow_the_canvas_on_the_inpainting_checkpoint(env: Env, words: list[str],
                                                                        size: tuple[int, int], what: str) -> None:
    first = (await env.run({"prompt": "a lighthouse", "seed": 5, **SMALL}, ALICE)).generation
    grown = await _done(env, await env.studio.actions.run(first.id, parse_action(words), ALICE))
    assert grown.kind == "outpaint" and _size(grown) == size
    # tiny-sd15's own family has an inpainting checkpoint in the folder: it fills the pad
    assert grown.workflow["36"]["inputs"]["ckpt_name"] == "tiny-sd15-inpainting.safetensors"
    assert grown.workflow["37"]["class_type"] == "VAEEncodeForInpaint"
    outpaint = _field(grown, "Outpaint")
    assert outpaint.startswith(what) and outpaint.endswith("filled by inpainting model tiny-sd15-inpainting")


async def test_outpaint_model_none_is_masked_sampling_on_the_parents_model(env: Env) -> None:
    first = (await env.run({"prompt": "a lighthouse", "seed": 5, **SMALL}, ALICE)).generation
    panned = await _done(env, await _actions(env, outpaint_model="none").pan(first.id, ALICE, direction="up"))
    assert _size(panned) == (64, 96) and "36" not in panned.workflow
    assert panned.workflow["15"]["class_type"] == "SetLatentNoiseMask"
    assert _field(panned, "Outpaint").endswith("filled by masked sampling on tiny-sd15")
    with pytest.raises(RequestInvalid, match="is SD1.x.*not an inpainting model"):
        await _actions(env, outpaint_model="tiny-sd15-b").zoom(first.id, ALICE)
    # "" finds no inpainting checkpoint of SD2's family in the folder: masked sampling on the model itself
    sd2 = (await env.run({"prompt": "a lighthouse", "model": "tiny-sd2-v", **SMALL}, ALICE)).generation
    zoomed = await _done(env, await env.studio.actions.zoom(sd2.id, ALICE))
    assert _size(zoomed) == (128, 128) and zoomed.workflow["4"]["inputs"]["ckpt_name"] == "tiny-sd2-v.safetensors"
    assert _field(zoomed, "Outpaint").endswith("filled by masked sampling on tiny-sd2-v")


async def test_the_presser_owns_the_job_and_their_queue_cap_refuses_it(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, **SMALL}, ALICE)).generation
    ticket = await env.studio.actions.upscale(first.id, BOB)
    upscaled = await _done(env, ticket)
    assert upscaled.requester_id == BOB.user_id and first.requester_id == ALICE.user_id
    env.studio.queue.per_user_max = 0
    rows = await env.store.recent()
    for press in (["U1"], ["zoom", "2"], ["vary", "strong"], ["reroll"]):
        with pytest.raises(RequestInvalid, match=r"needs 1 place\(s\) in the queue"):
            await env.studio.actions.run(first.id, parse_action(press), BOB)
    assert await env.store.recent() == rows


async def test_a_private_result_stays_private(env: Env) -> None:
    first = (await env.run({"prompt": "a secret garden", "private": True, **SMALL}, ALICE)).generation
    zoomed = await _done(env, await env.studio.actions.zoom(first.id, ALICE, factor=1.5))
    assert first.private and zoomed.private and zoomed.channel_id == first.channel_id
    with pytest.raises(GenerationNotFound, match="no generation"):  # someone else cannot reach it at all
        await env.studio.actions.upscale(first.id, BOB)


async def test_a_workflow_result_refuses_everything_but_reroll(env: Env) -> None:
    first = (await env.run({"prompt": "a teapot", "seed": 3, **SMALL}, ALICE)).generation
    ticket = await env.studio.workflows.run(json.dumps(first.workflow).encode(), "mine.json", ALICE,
                                            Origin(first.channel_id, first.guild_id))
    flow = await _done(env, ticket)
    for action in (Action("upscale", 1), Action("vary", arg="strong"), Action("zoom", arg="2"),
                   Action("pan", arg="left")):
        with pytest.raises(RequestInvalid, match=rf"#{flow.id} came from /workflow: .* needs an /imagine result"):
            await env.studio.actions.run(flow.id, action, ALICE)
    with pytest.raises(RequestInvalid, match="remix needs an /imagine result"):
        await env.studio.actions.remix_form(flow.id, ALICE)
    with pytest.raises(RequestInvalid, match="remix needs its edits"):
        await env.studio.actions.run(first.id, Action("remix"), ALICE)


async def test_remix_checks_each_field_as_imagine_does_and_keeps_the_rest(env: Env) -> None:
    first = (await env.run({"prompt": "a red fox <lora:tiny-lora-a:0.5>", "negative": "blurry", "seed": 3,
                            "sampler": "heun", **SMALL}, ALICE)).generation
    form = await env.studio.actions.remix_form(first.id, ALICE)
    assert form == RemixForm(prompt="a red fox <lora:tiny-lora-a:0.5>", negative="blurry", steps="2", cfg="7",
                             seed="3")
    rows = await env.store.recent()
    max_steps = env.settings.limits.max_steps
    with pytest.raises(RequestInvalid, match=rf"^steps: 'abc' is not a whole number; give 1 to {max_steps}$"):
        await env.studio.actions.remix(first.id, ALICE, {"steps": "abc"})
    with pytest.raises(RequestInvalid, match=r"cfg: '99' is outside 0 to 30; give 0 to 30"):
        await env.studio.actions.remix(first.id, ALICE, {"cfg": "99"})
    with pytest.raises(RequestInvalid, match="prompt is empty"):
        await env.studio.actions.remix(first.id, ALICE, {"prompt": "  "})
    with pytest.raises(RequestInvalid, match="remix changes prompt, negative, steps, cfg, seed; not width"):
        await env.studio.actions.remix(first.id, ALICE, {"width": "128"})
    assert await env.store.recent() == rows
    remixed = await _done(env, await env.studio.actions.remix(
        first.id, ALICE, {"prompt": "a blue fox", "steps": "3", "seed": ""}))
    params = remixed.params
    assert remixed.kind == "remix" and params["prompt"] == "a blue fox" and params["steps"] == 3
    assert params["negative"] == "blurry" and params["seed"] != 3 and params["sampler_name"] == "heun"
    assert (params["width"], params["height"], remixed.model_name) == (64, 64, first.model_name)
    assert params["loras"] == []  # the LoRA came from the prompt's tag, which the new prompt drops
    assert result_card(remixed).title == f"✏️ Remix of #{first.id}"


async def test_a_row_stored_as_params_version_2_still_rerolls_and_upscales(env: Env) -> None:
    first = (await env.run({"prompt": "a cabin in the woods", "seed": 1, **SMALL}, ALICE)).generation
    new_fields = ("upscale_by", "upscale_model", "upscale_method", "prescale", "outpaint", "outpaint_feathering",
                  "inpaint_checkpoint")
    with sqlite3.connect(env.store.path) as db:
        db.execute("UPDATE generations SET params_json = json_set(json_remove(params_json, "
                   + ", ".join(f"'$.{name}'" for name in new_fields) + "), '$.version', 2) WHERE id = ?", (first.id,))
    stored = (await env.store.get(first.id)).params
    assert stored["version"] == 2 and not set(new_fields) & set(stored)
    reroll = await _done(env, await env.studio.actions.run(first.id, Action("reroll"), ALICE))
    assert reroll.params["version"] == PARAMS_VERSION and reroll.params["upscale_by"] == 1.0
    assert _size(await _done(env, await env.studio.actions.upscale(first.id, ALICE))) == (128, 128)
