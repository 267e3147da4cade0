"""Prompt features through the engine: embeddings, long prompts, weighting modes, the encoder cache."""

from __future__ import annotations

import numpy as np

from engine.executor import Executor
from tests.engine.conftest import txt2img, with_changes
from tests.engine.test_runs import fresh_run, image_paths, pixels

LONG = " ".join(["red fox"] * 52)  # 104 tokens: two chunks of 77


def render(executor: Executor, workflow: dict) -> tuple[np.ndarray, dict]:
    result = fresh_run(executor, workflow)
    return pixels(image_paths(executor, result["outputs"])[0]), result["meta"]


def test_the_tiny_embedding_changes_the_image_and_counts_its_vectors(executor: Executor) -> None:
    plain, plain_meta = render(executor, txt2img(prompt="a fox", seed=2))
    embedded, meta = render(executor, txt2img(prompt="a fox embedding:tiny-embedding", seed=2))
    assert np.abs(embedded - plain).mean() > 1.0
    report = meta["tokens"]["6"]
    assert report["embeddings"] == ["tiny-embedding"]
    assert report["tokens"] == plain_meta["tokens"]["6"]["tokens"] + 2  # two vectors, one token each


def test_a_missing_embedding_is_a_warning_not_a_crash(executor: Executor) -> None:
    _, meta = render(executor, txt2img(prompt="a fox embedding:nope", seed=2))
    assert any("nope" in warning for warning in meta["tokens"]["6"]["warnings"])


def test_a_long_prompt_is_encoded_in_chunks_and_reported(executor: Executor) -> None:
    image, meta = render(executor, txt2img(prompt=LONG, seed=3))
    report = meta["tokens"]["6"]
    assert report["tokens"] == 104 and report["chunks"] == 2 and report["chunk_tokens"] == [75, 29]
    assert image.std() > 1.0


def test_config_chunk_limit_cuts_and_says_so(executor: Executor) -> None:
    limits = executor.limits
    executor.limits = limits.model_copy(update={"max_prompt_chunks": 1})
    try:
        _, meta = render(executor, txt2img(prompt=LONG, seed=3))
    finally:
        executor.limits = limits
    report = meta["tokens"]["6"]
    assert report["chunks"] == 1 and report["truncated"] > 0 and report["warnings"]


def test_a1111_weighting_differs_only_for_weighted_prompts(executor: Executor) -> None:
    settings = executor.settings
    weighted, unweighted = txt2img(prompt="a (red:1.5) fox", seed=4), txt2img(prompt="a red fox", seed=4)
    comfy_w, _ = render(executor, weighted)
    comfy_u, _ = render(executor, unweighted)
    executor.settings = settings.model_copy(update={"prompt_weighting": "a1111"})
    try:
        a1111_w, _ = render(executor, weighted)
        a1111_u, _ = render(executor, unweighted)
    finally:
        executor.settings = settings
    assert not np.array_equal(comfy_w, a1111_w)
    assert np.array_equal(comfy_u, a1111_u)


def test_the_same_text_twice_hits_the_encoder_cache(executor: Executor) -> None:
    executor.cache.clear()
    executor.models.prompt_cache.clear()
    meta = executor.run(with_changes(txt2img(prompt="a lone fox", seed=5), "7", text="a lone fox")).meta
    assert meta["encoder_cache"] == {"6": "miss", "7": "hit"}


def test_comfyui_syntax_draws_what_comfyui_reads(executor: Executor) -> None:
    """[engine] prompt_syntax = "comfy": a long prompt is cut at 75 tokens inside a word (Noodle's syntax moves the
    word whole), `((fox:1.3))` weighs 1.3 flat, and a short plain prompt draws the same pixels in both."""
    settings = executor.settings
    long_text = " ".join(["cat"] * 74) + " photorealistic"  # "photorealistic" is 2 tokens
    noodle_long, noodle_meta = render(executor, txt2img(prompt=long_text, seed=6))
    noodle_plain, _ = render(executor, txt2img(prompt="a red fox", seed=6))
    noodle_nested, _ = render(executor, txt2img(prompt="a ((fox:1.3))", seed=6))
    executor.settings = settings.model_copy(update={"prompt_syntax": "comfy"})
    try:
        comfy_long, comfy_meta = render(executor, txt2img(prompt=long_text, seed=6))
        comfy_plain, _ = render(executor, txt2img(prompt="a red fox", seed=6))
        comfy_nested, _ = render(executor, txt2img(prompt="a ((fox:1.3))", seed=6))
        comfy_flat, _ = render(executor, txt2img(prompt="a (fox:1.3)", seed=6))
    finally:
        executor.settings = settings
    assert noodle_meta["tokens"]["6"]["chunk_tokens"] == [74, 2]
    assert comfy_meta["tokens"]["6"]["chunk_tokens"] == [75, 1]
    assert not np.array_equal(noodle_long, comfy_long)
    assert np.array_equal(noodle_plain, comfy_plain)
    assert np.array_equal(comfy_nested, comfy_flat) and not np.array_equal(noodle_nested, comfy_nested)
