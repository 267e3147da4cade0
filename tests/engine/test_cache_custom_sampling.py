"""Caching with custom sampling: changing a Sampler* node's option re-runs only what depends on it."""

from __future__ import annotations

import copy
from typing import Any

from engine.executor import Executor
from tests.engine.conftest import txt2img


def custom(eta: float, s_noise: float = 1.0) -> dict[str, Any]:
    """txt2img with its KSampler replaced by SamplerCustom + BasicScheduler + SamplerEulerAncestral."""
    workflow = copy.deepcopy(txt2img(seed=3))
    ksampler = workflow.pop("3")["inputs"]
    workflow.update({
        "30": {"class_type": "BasicScheduler", "inputs": {"model": ksampler["model"], "scheduler": "karras",
                                                          "steps": 3, "denoise": 1.0}},
        "32": {"class_type": "SamplerEulerAncestral", "inputs": {"eta": eta, "s_noise": s_noise}},
        "3": {"class_type": "SamplerCustom", "inputs": {
            "model": ksampler["model"], "add_noise": True, "noise_seed": 3, "cfg": 7.0,
            "positive": ksampler["positive"], "negative": ksampler["negative"], "sampler": ["32", 0],
            "sigmas": ["30", 0], "latent_image": ksampler["latent_image"]}},
    })
    return workflow


def test_a_sampler_option_reruns_only_the_sampler_node_and_what_follows(executor: Executor) -> None:
    executor.cache.clear()
    first = executor.run(custom(eta=1.0))
    assert first.meta["cached"] == []
    changed = executor.run(custom(eta=0.5))
    assert sorted(changed.meta["cached"]) == ["30", "4", "5", "6", "7"]  # loader, encodes, latent, schedule
    assert set(changed.meta["timings"]) == {"32", "3", "8", "9", "total"}
    assert changed.outputs != first.outputs  # a new picture, not a stale cached one
    again = executor.run(custom(eta=0.5))
    assert len(again.meta["cached"]) == len(custom(eta=0.5))
