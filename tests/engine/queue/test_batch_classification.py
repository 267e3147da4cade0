"""Which samplers the queue may batch, checked against what batching does to each one.

The queue batches jobs only under samplers in `samplers.DETERMINISTIC_SAMPLERS`: a latent sampled in a batch with
another must get exactly its solo result. This runs every ComfyUI sampler Noodle has on a batch of two and on each
latent alone (the analytic model of the sampler tests), so a new sampler can be neither batched wrongly (step noise
drawn for the whole batch, a step size chosen from the whole batch) nor left out without a reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine import samplers as S
from engine.executor import Executor
from engine.queue.batching import sampler_steps
from tests.engine.conftest import txt2img
from tests.engine.samplers.sampler_support import MS, gaussian_eps, latents

pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


def _run(name: str, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    sigmas = S.ksampler_sigmas("karras", 6, 1.0, MS, sampler_name=name)
    return S.sample(S.build_scheduler(name, "karras", sigmas, 5), gaussian_eps, latent, noise)


@pytest.mark.parametrize("name", S.SUPPORTED_SAMPLERS)
def test_a_sampler_is_batched_exactly_when_each_latent_gets_its_solo_result(name: str) -> None:
    image, noise = latents(3)
    latent = image * 0.0
    together = _run(name, latent, noise)
    alone = torch.cat([_run(name, latent[i:i + 1], noise[i:i + 1]) for i in range(2)])
    difference = float((together - alone).abs().max())
    if name in S.DETERMINISTIC_SAMPLERS:
        assert difference <= 1e-6, f"{name} is batched but a batch changes its result by {difference}"
    else:
        assert difference > 1e-5, f"{name} runs alone although a batch gives each latent its solo result"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_options_that_turn_step_noise_off_make_a_sampler_batchable(name: str) -> None:
    assert S.uses_kdiffusion(name, {"eta": 0.0})
    assert not S.is_deterministic(name) and S.is_deterministic(name, {"eta": 0.0})


def test_queue_eta_counts_custom_sampling_steps(executor: Executor) -> None:
    workflow = copy.deepcopy(txt2img())
    ksampler = workflow.pop("3")["inputs"]
    workflow.update({
        "30": {"class_type": "BasicScheduler", "inputs": {"model": ksampler["model"], "scheduler": "karras",
                                                          "steps": 9, "denoise": 1.0}},
        "31": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["30", 0], "step": 3}},
        "32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "3": {"class_type": "SamplerCustom", "inputs": {
            "model": ksampler["model"], "add_noise": True, "noise_seed": 1, "cfg": 7.0,
            "positive": ksampler["positive"], "negative": ksampler["negative"], "sampler": ["32", 0],
            "sigmas": ["31", 1], "latent_image": ksampler["latent_image"]}},
    })
    assert sampler_steps(executor.validate(workflow), executor) == 6  # the low half of 9 steps split at 3
