"""Ways around a server's rules a review found, each closed: a banned word split by what the encoder drops, the
enforced negative used as a positive through a guider, dropped by a look-alike or weighed to nothing, drawn at
cfg 0, and two moderators' changes at once. On the real Studio, a real SQLite file and the tiny models."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bot.core.errors import RequestInvalid
from bot.core.front_end import Origin, Requester
from bot.core.presets import Preset
from bot.core.safety.gate import RuleRefused
from bot.core.safety.graph import negative_only, with_negative
from bot.core.safety.rules import ServerRules
from tests.bot.conftest import Env
from tests.bot.core.safety.test_doors import _text_workflow

GUILD = "777"
ALICE = Requester("42", GUILD, "alice")
MOD1, MOD2 = Requester("7", GUILD, "mod1", manage_server=True), Requester("8", GUILD, "mod2", manage_server=True)
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 5}
ENFORCED = "nsfw, nude"


def _origin(env: Env) -> Origin:
    return Origin(str(env.channel.id), GUILD, False)


def _texts(workflow: dict[str, Any]) -> dict[str, str]:
    return {node_id: node["inputs"]["text"] for node_id, node in workflow.items()
            if node["class_type"] == "CLIPTextEncode"}


@pytest.mark.parametrize("prompt", ["a nu()de statue", "a nu[]de statue", "a nu(:1)de statue",
                                    "a nu<lora:whatever:0>de statue"])
async def test_a_banned_word_split_by_what_the_encoder_drops_is_refused(env: Env, prompt: str) -> None:
    """Each encodes as 'a nude statue' (the brackets and the tag go, the word closes up); each was admitted."""
    await env.studio.gate.put_rules(GUILD, ServerRules(banned_words=("nude",)))
    with pytest.raises(RuleRefused, match="the word 'nude'"):
        await env.run({"prompt": prompt, **SMALL}, ALICE)
    with pytest.raises(RuleRefused, match=r"node 2 \(CLIPTextEncode\) text contains the word 'nude'"):
        await env.studio.workflows.run(_text_workflow(prompt), "statue.json", ALICE, _origin(env))


def _dual_cfg(positive_text: str) -> dict[str, Any]:
    """A DualCFGGuider graph whose cond1 (a positive) is also wired as the negative."""
    graph = json.loads(_text_workflow(positive_text))
    graph.pop("4")
    graph.update({
        "10": {"class_type": "DualCFGGuider", "inputs": {"model": ["1", 0], "cond1": ["2", 0], "cond2": ["6", 0],
                                                         "negative": ["2", 0], "cfg_conds": 7.0,
                                                         "cfg_cond2_negative": 1.0, "style": "regular"}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["10", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["3", 0]}}})
    graph["5"]["inputs"]["samples"] = ["14", 0]
    return graph


async def test_the_enforced_negative_used_as_a_guiders_positive_is_the_members_own_words(env: Env) -> None:
    """cond1 counted as no positive, so a box wired as cond1 and as the negative was 'negative only', and the
    server's own phrase in it was taken out before the check: 'nsfw, nude' drawn as a positive, admitted."""
    graph = _dual_cfg(ENFORCED)
    assert negative_only(graph) == set()
    await env.studio.gate.put_rules(GUILD, ServerRules(banned_words=("nude", "nsfw"), enforced_negative=ENFORCED))
    with pytest.raises(RuleRefused, match="contains the word"):
        await env.studio.workflows.run(json.dumps(graph).encode(), "guider.json", ALICE, _origin(env))
    fixed = with_negative(_dual_cfg("a red fox"), ENFORCED)  # the positive is not appended to: a concat is
    assert _texts(fixed)["2"] == "a red fox" and fixed["10"]["inputs"]["negative"] != ["2", 0]


@pytest.mark.parametrize(("negative", "appended"), [
    ("xnsfw, nudex", True),  # a look-alike: it 'contained' the phrase
    ("(nsfw, nude:0)", True),  # the phrase weighed to nothing
    ("blurry, nsfw, nude", False),  # there already, at full weight
    ("(nsfw, nude:1.3)", False),
])
async def test_the_enforced_negative_counts_as_there_only_as_whole_words_at_full_weight(
        env: Env, negative: str, appended: bool) -> None:
    await env.studio.gate.put_rules(GUILD, ServerRules(enforced_negative=ENFORCED))
    made = (await env.run({"prompt": "a cat", "negative": negative, **SMALL}, ALICE)).generation
    assert made is not None and made.state == "done"
    expected = f"{negative}, {ENFORCED}" if appended else negative
    assert made.params["negative"] == expected and expected in _texts(made.workflow).values()


def test_a_negative_whose_unclosed_bracket_would_weigh_the_phrase_down_gets_it_in_an_encode_of_its_own() -> None:
    graph = json.loads(_text_workflow("a red fox"))
    graph["6"]["inputs"]["text"] = "[[[[[[ blurry"
    fixed = with_negative(graph, ENFORCED)
    assert _texts(fixed)["6"] == "[[[[[[ blurry"  # left as written ...
    joined = fixed[fixed["4"]["inputs"]["negative"][0]]
    assert joined["class_type"] == "ConditioningConcat"  # ... and the phrase concatenated at full weight
    assert fixed[joined["inputs"]["conditioning_from"][0]]["inputs"]["text"] == ENFORCED
    assert with_negative(fixed, ENFORCED) == fixed  # a reroll adds nothing more


@pytest.mark.parametrize(("syntax", "appended"), [("noodle", False), ("comfy", True)])
def test_the_enforced_negative_is_weighed_as_the_engines_syntax_reads_it(syntax: str, appended: bool) -> None:
    """`((nsfw, nude:0.95))` is 1.1 x 1.1 x 0.95 = 1.15 in Noodle's syntax, but 0.95 flat in ComfyUI's: read with
    Noodle's rules under prompt_syntax = "comfy", the weakened phrase would count as there."""
    graph = json.loads(_text_workflow("a red fox"))
    graph["6"]["inputs"]["text"] = "((nsfw, nude:0.95))"
    fixed = with_negative(graph, ENFORCED, syntax)  # type: ignore[arg-type]
    assert (_texts(fixed)["6"] == f"((nsfw, nude:0.95)), {ENFORCED}") is appended


@pytest.mark.parametrize("syntax", ["noodle", "comfy"])
def test_the_enforced_negative_behind_an_embedding_reference_is_not_there(syntax: str) -> None:
    """The encoder reads `embedding:nsfw,nude` as an embedding (or drops it), never as the words: the phrase was
    counted as there and nothing was appended."""
    graph = json.loads(_text_workflow("a red fox"))
    graph["6"]["inputs"]["text"] = "blurry embedding:nsfw,nude"
    fixed = with_negative(graph, ENFORCED, syntax)  # type: ignore[arg-type]
    assert _texts(fixed)["6"] == f"blurry embedding:nsfw,nude, {ENFORCED}"


async def test_below_cfg_1_is_refused_where_a_negative_is_enforced(env: Env) -> None:
    """At cfg 0 the sampler draws its negative alone: the server's enforced 'nsfw, nude'."""
    await env.studio.gate.put_rules(GUILD, ServerRules(enforced_negative=ENFORCED))
    with pytest.raises(RuleRefused, match="cfg 0.5 is under 1"):
        await env.run({"prompt": "a cat", "cfg": 0.5, **SMALL}, ALICE)
    graph = _dual_cfg("a red fox")
    graph["10"]["inputs"]["cfg_cond2_negative"] = 0.0
    with pytest.raises(RuleRefused, match=r"node 10 \(DualCFGGuider\) cfg_cond2_negative 0.0 is under 1"):
        await env.studio.workflows.run(json.dumps(graph).encode(), "low.json", ALICE, _origin(env))
    assert (await env.run({"prompt": "a cat", "cfg": 1.0, **SMALL}, ALICE)).generation is not None
    await env.studio.gate.put_rules(GUILD, ServerRules())  # no enforced negative: cfg 0 is the member's choice
    assert (await env.run({"prompt": "a cat", "cfg": 0.0, **SMALL}, ALICE)).generation is not None


async def test_two_moderators_changing_the_rules_at_once_both_changes_stay(env: Env) -> None:
    await asyncio.gather(env.studio.moderation.rules(MOD1, {"ban": "gore"}),
                         env.studio.moderation.rules(MOD2, {"threshold": 0.5}))
    rules = await env.studio.gate.rules(GUILD)
    assert rules.banned_words == ("gore",) and rules.threshold == 0.5  # the ban was lost


async def test_two_creates_of_one_preset_name_at_once_one_is_told_it_exists(env: Env) -> None:
    results = await asyncio.gather(env.studio.presets.create(MOD1, Preset(name="anime", steps=20)),
                                   env.studio.presets.create(MOD2, Preset(name="anime", steps=30)),
                                   return_exceptions=True)
    assert [type(result) for result in results].count(RequestInvalid) == 1, results  # was an IntegrityError
    assert "already exists" in str(next(r for r in results if isinstance(r, RequestInvalid)))
