"""Nothing slips through another door: every way of making an image (/imagine with its styles, wildcards, presets and
`<lora:>` tags, 🔁, 🔀, U/V/Vary/zoom/pan, ✏️ remix, /workflow and its 🔁) is tried with a banned word and with an
image over the threshold, on the real Studio, the real classifier, a real SQLite file and the tiny models.

Over-threshold images: `high_image()` (tests/bot/core/safety/test_nsfw.py, ~0.80 on open_nsfw) as an upload and as
a /workflow's LoadImage -> SaveImage result, with the server's threshold at 0.6. A tiny model's own pictures score
~0.01, so the doors that sample one (🔁, 🔀, the buttons, remix) are tried with the threshold at 0: every result is
over it, and each must still reach the classifier and the rules before anyone sees it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from bot.core.actions import parse_action
from bot.core.front_end import Origin, Requester
from bot.core.presets import Preset
from bot.core.requests.imagine import ImageUpload
from bot.core.safety.gate import MemberBlocked, RuleRefused
from bot.core.safety.rules import ServerRules
from bot.core.storage.records import Generation
from tests.bot.conftest import Env
from tests.bot.core.safety.test_nsfw import high_image

GUILD = "777"
ALICE, BOB = Requester("42", GUILD, "alice"), Requester("99", GUILD, "bob")
MANAGER = Requester("7", GUILD, "mod", manage_server=True)
SMALL = {"steps": 2, "width": 64, "height": 64}


async def _rules(env: Env, **fields: Any) -> None:
    await env.studio.gate.put_rules(GUILD, ServerRules(**fields))


def _origin(env: Env, *, nsfw: bool = False) -> Origin:
    return Origin(str(env.channel.id), GUILD, nsfw)


async def _made(env: Env, prompt: str = "a red fox", **options: Any) -> Generation:
    final = await env.run({"prompt": prompt, "seed": 5, **SMALL, **options}, ALICE)
    assert final.error is None, final.error
    return final.generation  # type: ignore[return-value]


async def _refusals(env: Env, who: Requester = ALICE) -> list[str]:
    return [refusal.door for refusal in await env.store.refusals(GUILD, who.user_id, 50)]


def _high_png() -> bytes:
    buffer = io.BytesIO()
    high_image().save(buffer, format="PNG")
    return buffer.getvalue()


def _load_and_save(image: str) -> bytes:
    """LoadImage -> SaveImage of `image`, beside a small txt2img branch (whose seed a 🔁 changes)."""
    graph = json.loads(_text_workflow("a lighthouse"))
    graph["8"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "loaded"}}
    return json.dumps(graph).encode()


def _text_workflow(text: str) -> bytes:
    return json.dumps({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["6", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "doors"}},
    }).encode()


# -- banned words ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, word", [
    ({"prompt": "a nude figure"}, "nude"),
    ({"prompt": "a n u d e figure"}, "nude"),  # the article joins the run of letters: looked for inside it
    ({"prompt": "a {cat|n.u.d.e} in the snow", "seed": 1}, "nude"),  # refused whichever the seed picks
    ({"prompt": "a cat", "negative": "(NUDE:0.1)"}, "nude"),  # cfg under 1 draws the negative: it is checked too
    ({"prompt": "a cat", "style": "cinematic"}, "grain"),  # the style adds "film grain"
    ({"prompt": "a __animals__ at dusk", "seed": 3}, "fox"),  # a wildcard file picks an animal
    ({"prompt": "a nu<lora:tiny-lora-a:0.5>de statue"}, "nude"),  # the tag leaves, the word closes up
])
async def test_imagine_refuses_a_banned_word_however_it_arrives(env: Env, options: dict[str, Any],
                                                                word: str) -> None:
    animals = ["fox", "cat", "dog", "owl", "rabbit", "horse", "otter", "parrot"]
    await _rules(env, banned_words=("nude", "grain", *(animals if word == "fox" else ())))
    with pytest.raises(RuleRefused, match="contains the word") as refused:
        await env.run({**SMALL, **options}, ALICE)
    assert any(f"'{banned}'" in str(refused.value) for banned in ("nude", "grain", *animals))
    assert await env.store.recent(ALICE.user_id) == []  # nothing stored, nothing queued
    assert await _refusals(env) == ["imagine"]


async def test_a_preset_cannot_carry_a_banned_word_in(env: Env) -> None:
    await env.studio.presets.create(MANAGER, Preset(name="film", style="cinematic"))
    await env.studio.presets.create(MANAGER, Preset(name="dark", negative="gore, blurry"))
    await _rules(env, banned_words=("grain", "gore"))
    for preset, word in (("film", "grain"), ("dark", "gore")):
        with pytest.raises(RuleRefused, match=f"'{word}'"):
            await env.studio.generations.imagine({"prompt": "a lighthouse", "preset": preset, **SMALL}, ALICE,
                                                 _origin(env))


async def test_every_action_on_a_result_is_refused_once_its_words_are_banned(env: Env) -> None:
    first = await _made(env, "a red fox")
    await _rules(env, banned_words=("fox",))
    studio, origin = env.studio, _origin(env)
    doors = {
        "reroll": studio.generations.reroll(first.id, BOB, origin),
        "variation": studio.generations.variation(first.id, BOB, 1, origin),
        "upscale": studio.actions.run(first.id, parse_action(["U1"]), BOB, origin),
        "vary": studio.actions.run(first.id, parse_action(["V1"]), BOB, origin),
        "zoom": studio.actions.run(first.id, parse_action(["zoom", "2"]), BOB, origin),
        "pan": studio.actions.run(first.id, parse_action(["pan", "left"]), BOB, origin),
        "remix": studio.actions.remix(first.id, BOB, {"prompt": "a grey cat, n.u.d.e"}, origin),
        "remix (same words)": studio.actions.remix(first.id, BOB, {"steps": "3"}, origin),
    }
    await _rules(env, banned_words=("fox", "nude"))
    for door, attempt in doors.items():
        with pytest.raises(RuleRefused, match="contains the word"):
            await attempt
    assert len(await _refusals(env, BOB)) == len(doors)
    assert [g.id for g in await env.store.recent(limit=50)] == [first.id]  # not one new request


async def test_a_workflow_is_refused_by_node_and_its_reroll_after_a_ban(env: Env) -> None:
    await _rules(env, banned_words=("nude",))
    with pytest.raises(RuleRefused, match=r"node 2 \(CLIPTextEncode\) text contains the word 'nude'"):
        await env.studio.workflows.run(_text_workflow("a NUDE statue"), "statue.json", ALICE, _origin(env))
    await _rules(env)
    made = (await env.finish(await env.studio.workflows.run(_text_workflow("a red fox"), "fox.json", ALICE,
                                                            _origin(env)))).generation
    await _rules(env, banned_words=("fox",))
    with pytest.raises(RuleRefused, match="node 2"):
        await env.studio.generations.reroll(made.id, ALICE, _origin(env))


async def test_blocked_models_and_a_blocked_member_are_refused_at_every_door(env: Env) -> None:
    first = await _made(env)
    await _rules(env, checkpoints_blocked=("tiny-sd15",))
    with pytest.raises(RuleRefused, match="checkpoint 'tiny-sd15.safetensors' is not allowed"):
        await env.run({"prompt": "a cat", "model": "tiny-sd15", **SMALL}, ALICE)
    with pytest.raises(RuleRefused, match="not allowed"):
        await env.studio.generations.reroll(first.id, ALICE, _origin(env))
    await _rules(env, loras_allowed=("tiny-lora-b",))
    with pytest.raises(RuleRefused, match="LoRA 'tiny-lora-a.safetensors' is not allowed.*tiny-lora-b"):
        await env.run({"prompt": "a cat <lora:tiny-lora-a:0.7>", **SMALL}, ALICE)
    await _rules(env)
    await env.studio.moderation.block(MANAGER, ALICE.user_id, "spam")
    for attempt in (env.run({"prompt": "a cat", **SMALL}, ALICE),
                    env.studio.generations.reroll(first.id, ALICE, _origin(env)),
                    env.studio.actions.run(first.id, parse_action(["U1"]), ALICE, _origin(env)),
                    env.studio.workflows.run(_text_workflow("a cat"), "cat.json", ALICE, _origin(env))):
        with pytest.raises(MemberBlocked, match=r"blocked you from using Noodle here \(spam\)"):
            await attempt
    await env.studio.moderation.unblock(MANAGER, ALICE.user_id)
    await _made(env, "a cat")


# -- images over the threshold ----------------------------------------------------------------------------------

async def test_an_upload_over_the_threshold_is_refused_where_results_would_be_blocked(env: Env) -> None:
    await _rules(env, threshold=0.6)
    upload = ImageUpload(filename="high.png", content_type="image/png", data=_high_png())
    request = await env.studio.generations.parse({"prompt": "a fox", "image": upload, "steps": 2})
    with pytest.raises(RuleRefused, match=r"image: the NSFW classifier scored the attached image 0\.\d\d"):
        await env.studio.generations.submit(request, ALICE, _origin(env))
    ticket = await env.studio.generations.submit(request, ALICE, _origin(env, nsfw=True))  # an NSFW channel: allowed
    generation = (await env.finish(ticket)).generation
    assert generation.request["image"]["nsfw_score"] > 0.6  # the upload's score is stored with the generation


async def test_a_workflow_result_over_the_threshold_is_held_back_and_so_is_its_reroll(env: Env) -> None:
    (env.settings.engine.input_dir / "doors-high.png").write_bytes(_high_png())
    await _rules(env, threshold=0.6)
    posted_before = len(env.channel.results())
    final = await env.finish(await env.studio.workflows.run(_load_and_save("doors-high.png"), "high.json", ALICE,
                                                            _origin(env)))
    held = await env.store.get(final.generation.id)
    assert held.safety == "block" and held.nsfw_score > 0.6 and held.message_id is None
    assert len(env.channel.results()) == posted_before  # nothing in the channel
    assert "was not posted" in env.client.get_user(42).dms[-1][0]  # the requester is told, privately
    again = await env.finish(await env.studio.generations.reroll(held.id, ALICE, _origin(env)))
    assert (await env.store.get(again.generation.id)).safety == "block"
    await _rules(env, threshold=0.6, normal="spoiler")
    shown = await env.finish(await env.studio.generations.reroll(held.id, ALICE, _origin(env)))
    assert (await env.store.get(shown.generation.id)).safety == "spoiler"
    assert all(f.filename.startswith("SPOILER_") for f in env.channel.results()[-1].files)
    nsfw = next(field for field in env.channel.results()[-1].embed.fields if field.name == "NSFW")
    assert nsfw.value.startswith("classifier score 0.") and "behind a spoiler" in nsfw.value


async def test_every_door_that_samples_passes_the_classifier_before_it_is_shown(env: Env) -> None:
    first = await _made(env)
    assert first.safety == "allow" and 0 <= first.nsfw_score < 0.5  # a tiny model's noise is not NSFW
    await _rules(env, threshold=0.0)  # every result is over it now
    studio, origin = env.studio, _origin(env)
    posted = len(env.channel.results())
    doors = [lambda: studio.generations.reroll(first.id, BOB, origin),
             lambda: studio.generations.variation(first.id, BOB, 1, origin),
             lambda: studio.actions.run(first.id, parse_action(["U1"]), BOB, origin),
             lambda: studio.actions.run(first.id, parse_action(["V1"]), BOB, origin),
             lambda: studio.actions.run(first.id, parse_action(["zoom", "2"]), BOB, origin),
             lambda: studio.actions.run(first.id, parse_action(["pan", "up"]), BOB, origin),
             lambda: studio.actions.remix(first.id, BOB, {"prompt": "a grey cat"}, origin)]
    for door in doors:  # one at a time: the member's queue cap holds five
        held = await env.store.get((await env.finish(await door())).generation.id)
        assert held.safety == "block" and held.nsfw_scores, held.kind
    assert len(env.channel.results()) == posted
    with pytest.raises(RuleRefused.__mro__[1], match="held back by this server's rules"):  # RequestInvalid
        await studio.generations.variation(held.id, BOB, 1, origin)  # nothing is made from a held-back image
    history = await studio.moderation.history(MANAGER, BOB.user_id)
    assert history.count("held back") == len(doors) and "NSFW 0." in history


async def test_the_enforced_negative_reaches_every_sampler_once(env: Env) -> None:
    await _rules(env, enforced_negative="ugly, watermark")
    made = await _made(env, negative="blurry")
    assert made.params["negative"] == "blurry, ugly, watermark"
    negatives = [node["inputs"]["text"] for node in made.workflow.values() if node["class_type"] == "CLIPTextEncode"]
    assert "blurry, ugly, watermark" in negatives
    reroll = (await env.finish(await env.studio.generations.reroll(made.id, ALICE, _origin(env)))).generation
    assert reroll.params["negative"] == "blurry, ugly, watermark"  # not appended twice
    flow = (await env.finish(await env.studio.workflows.run(_text_workflow("a fox"), "fox.json", ALICE,
                                                            _origin(env)))).generation
    assert flow.workflow["6"]["inputs"]["text"] == "blurry, ugly, watermark"


async def test_a_reroll_from_dms_of_a_private_result_keeps_the_servers_rules(env: Env) -> None:
    private = await _made(env, "a red fox", private=True)
    assert private.guild_id == GUILD
    await _rules(env, banned_words=("fox",), enforced_negative="watermark")
    in_dms, dm_origin = Requester(ALICE.user_id, None, "alice"), Origin("10042", None)
    with pytest.raises(RuleRefused, match="'fox'"):  # the 🔁 under the DM'd result names no server
        await env.studio.generations.reroll(private.id, in_dms, dm_origin)
    await _rules(env, enforced_negative="watermark")
    again = (await env.finish(await env.studio.generations.reroll(private.id, in_dms, dm_origin))).generation
    assert again.guild_id == GUILD and again.private and again.params["negative"] == "watermark"
    await env.studio.moderation.block(MANAGER, ALICE.user_id, "")
    with pytest.raises(MemberBlocked):
        await env.studio.generations.reroll(private.id, in_dms, dm_origin)


async def test_the_servers_and_the_owners_own_negative_words_are_not_held_against_a_member(env: Env) -> None:
    await _rules(env, banned_words=("nsfw",), enforced_negative="nsfw, nude")
    made = await _made(env, negative="blurry")  # the enforced negative holds the banned word: not the member's
    assert made.params["negative"] == "blurry, nsfw, nude"
    again = (await env.finish(await env.studio.generations.reroll(made.id, ALICE, _origin(env)))).generation
    assert again.params["negative"] == "blurry, nsfw, nude"
    remixed = await env.studio.actions.remix(made.id, ALICE, {"steps": "3"}, _origin(env))  # the form holds it too
    assert (await env.finish(remixed)).error is None
    with pytest.raises(RuleRefused, match="negative contains the word 'nsfw'"):  # typed by the member: refused
        await env.run({"prompt": "a cat", "negative": "nsfw, blurry", **SMALL}, ALICE)
    with pytest.raises(RuleRefused, match="'nsfw'"):  # the enforced words in a positive are the member's
        await env.run({"prompt": "a cat, nsfw, nude", **SMALL}, ALICE)


async def test_without_a_model_asked_for_the_first_checkpoint_the_server_allows_is_used(env: Env) -> None:
    await _rules(env, checkpoints_allowed=("tiny-sd15-b",))
    made = await _made(env)  # [bot] default_model is tiny-sd15, which this server does not allow
    assert made.model_name == "tiny-sd15-b.safetensors"
    with pytest.raises(RuleRefused, match="the checkpoints allowed here: tiny-sd15-b"):
        await env.run({"prompt": "a cat", "model": "tiny-sd15", **SMALL}, ALICE)
