"""The card under a result: the same words in the Discord embed and on the console, inside Discord's limits."""

from __future__ import annotations

from typing import Any

from bot.core.cards.card import token_usage
from bot.core.cards.result import card_text, result_card, status_text
from bot.discord_app.embeds import to_embed
from bot.core.storage.records import Generation, JobRow

WORKFLOW = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0], "seed": 42}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {}}, "7": {"class_type": "CLIPTextEncode", "inputs": {}}}


def _generation(**overrides: Any) -> Generation:
    params = {"prompt": "a red fox", "negative": "blurry", "steps": 20, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "karras", "width": 512, "height": 768, "loras": [
                  {"name": "detail.safetensors", "strength_model": 0.8, "strength_clip": 0.8},
                  {"name": "style.safetensors", "strength_model": 0.5, "strength_clip": 0.3}]}
    jobs = tuple(JobRow(idx=n, job_id=f"job{n}", seed=41 + n, workflow=WORKFLOW, state="done",
                        image_path=f"/out/{n}.png") for n in (1, 2))
    base: dict[str, Any] = dict(
        id=12, kind="imagine", parent_id=None, front="discord", state="done", requester_id="42", guild_id="1",
        channel_id="2", message_id="3", request={}, params=params, model_name="real_v5.safetensors",
        model_hash="0123456789", created_at=100.0, started_at=101.5, jobs=jobs,
        tokens={"6": {"tokens": 42, "chunks": 1}, "7": {"tokens": 9, "chunks": 1}}, cached=["4", "6", "7"],
        timings={"total": 3.25})
    base.update(overrides)
    return Generation(**base)


def test_the_card_shows_what_made_the_picture() -> None:
    fields = dict(result_card(_generation()).fields)
    assert fields["Seed"] == "#1 42 · #2 43"
    assert fields["Steps · CFG · Sampler"] == "20 · 7 · euler/karras"
    assert fields["Model"] == "real_v5 (0123456789)"
    assert fields["LoRAs"] == "detail 0.8, style 0.5/0.3"
    assert fields["Size"] == "512×768 ×2"
    assert fields["Tokens"] == "prompt 42/75 · negative 9/75"
    assert fields["Time"] == "queue 1.5 s · generation 3.2 s"
    assert fields["Cached"].startswith("checkpoint, prompt, negative (nodes 4, 6, 7)")


def test_token_usage_shows_chunks_and_cut_tokens_past_75() -> None:
    generation = _generation(tokens={"6": {"tokens": 130, "chunks": 2}, "7": {"tokens": 700, "chunks": 8,
                                                                             "truncated": 100}})
    assert token_usage(generation) == "prompt 130/150 (2 chunks) · negative 700/600 (8 chunks, 100 cut)"
    sdxl = _generation(tokens={"6": {"text_g": {"tokens": 5, "chunks": 1}, "text_l": {"tokens": 5, "chunks": 1}}})
    assert token_usage(sdxl).startswith("prompt 5/75")


def test_console_and_discord_show_the_same_card() -> None:
    card = result_card(_generation())
    text = card_text(card)
    embed = to_embed(card)
    assert text.splitlines()[1] == "Prompt: a red fox" and embed.description == "a red fox"
    for field in embed.fields:
        assert f"{field.name}: {field.value.replace(chr(10), '; ')}" in text
    assert "job job1 (+1 more) · #12" in text and embed.footer.text in text


def test_the_longest_allowed_prompts_still_fit_in_an_embed() -> None:
    generation = _generation(params={**_generation().params, "prompt": "fox " * 1000, "negative": "ugly " * 800})
    embed = to_embed(result_card(generation))
    assert len(embed) <= 6000 and len(embed.description) <= 4096
    assert all(len(field.value) <= 1024 for field in embed.fields)
    assert embed.description.endswith("…")


def test_status_lines_show_the_queue_then_the_steps() -> None:
    assert status_text("position", position=1, job_id="j") == "⏳ Queued: next · job j"
    assert status_text("position", position=3, eta_s=12.4) == "⏳ Queued: #3 in the queue, about 12 s"
    line = status_text("progress", value=5, total=20, images=4, images_done=1)
    assert "step 5/20" in line and "1/4 images done" in line and "███░░░░░░░░░" in line
