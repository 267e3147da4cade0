"""Dynamic batching: which graphs share a sampler call, and a batch giving each job its solo picture."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from engine.executor import Executor
from engine.nodes.guidance import guided_eps
from engine.pngmeta import parse_parameters, read_png_texts
from engine.queue import JobCancelled, Owner
from engine.queue.batching import batch_key, sampler_steps
from engine.values import CondItem, Conditioning
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, Gate, QueueEnv, collect, image_of, rows

USERS = [Owner(name) for name in ("ann", "bob", "dan", "eve")]


def key(executor: Executor, workflow: dict[str, Any]) -> str | None:
    return batch_key(executor.validate(workflow))


def test_graphs_that_differ_only_in_seeds_prompts_and_prefixes_share_a_key(executor: Executor) -> None:
    base = key(executor, txt2img())
    assert base is not None
    assert key(executor, txt2img(seed=9, prompt="a cat on a mat", negative="", filename_prefix="other")) == base
    for change in ({"steps": 5}, {"cfg": 6.5}, {"width": 72}, {"checkpoint": "tiny-sd15-b.safetensors"},
                   {"loras": (("tiny-lora-a.safetensors", 1.0, 1.0),)}, {"sampler_name": "heun"},
                   {"scheduler": "karras"}, {"denoise": 0.9}, {"batch_size": 2}):
        assert key(executor, txt2img(**change)) not in (base, None), change


def test_samplers_with_step_noise_and_other_graphs_run_alone(executor: Executor) -> None:
    # ancestral and SDE samplers draw fresh noise for the whole batch: no item would match its solo run
    assert key(executor, txt2img(sampler_name="euler_ancestral")) is None
    assert key(executor, txt2img(sampler_name="dpmpp_2m_sde")) is None
    hires = copy.deepcopy(txt2img())  # a second sampler on the first one's output
    hires["20"] = {"class_type": "KSampler", "inputs": {**hires["3"]["inputs"], "latent_image": ["3", 0],
                                                        "denoise": 0.5}}
    hires["8"]["inputs"]["samples"] = ["20", 0]
    assert key(executor, hires) is None
    assert sampler_steps(executor.validate(hires), executor) == 8


def test_per_item_conds_guide_their_own_latents() -> None:
    class MeanOfContext(torch.nn.Module):
        device, dtype = torch.device("cpu"), torch.float32

        def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: Any) -> Any:
            value = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x)
            return type("Out", (), {"sample": value})()

    def cond(value: float, tokens: int = 77) -> Conditioning:
        return Conditioning((CondItem(torch.full((1, tokens, 8), value)),))

    eps = guided_eps(MeanOfContext(), [cond(2.0), cond(4.0, tokens=154)], [cond(1.0), cond(0.0)], cfg=2.0,
                     sdxl=False, pixel_size=(64, 64), sizes=[1, 2])
    out = eps(torch.zeros(3, 4, 8, 8), torch.tensor(500), torch.tensor(1.0))
    assert torch.allclose(out[0], torch.full_like(out[0], 1.0 + (2.0 - 1.0) * 2.0))
    assert torch.allclose(out[1:], torch.full_like(out[1:], 0.0 + (4.0 - 0.0) * 2.0))
    with pytest.raises(ValueError, match="one pair per group"):
        guided_eps(MeanOfContext(), [cond(1.0)], [cond(1.0), cond(1.0)], 2.0, False, (64, 64), sizes=[1, 1])


async def test_compatible_queued_jobs_run_as_one_batch_each_matching_its_solo_run(
        queue_env: QueueEnv, executor: Executor) -> None:
    jobs = [txt2img(seed=s, prompt=p, filename_prefix=f"batch{n}")
            for n, (s, p) in enumerate([(501, "a red fox"), (502, "a blue whale under the sea"), (503, "a cat")])]
    odd_one = txt2img(seed=504, steps=5)  # another step count: not compatible
    executor.cache.clear()
    solo = [image_of(executor, executor.run(workflow).to_dict()) for workflow in jobs]
    executor.cache.clear()  # the batch must sample, not find the solo runs' latents

    service = await queue_env.start(batch_max=4)
    held = await service.submit(queue_env.held(), Owner("cat"))
    await queue_env.gate.wait_entered()
    handles = [await service.submit(workflow, user) for workflow, user in zip([*jobs, odd_one], USERS)]
    followed = [handle.events() for handle in handles]
    queue_env.gate.open()
    await held.result(timeout=TIMEOUT)
    results = [await handle.result(timeout=TIMEOUT) for handle in handles]

    ids = [handle.job_id for handle in handles[:3]]
    for n, (result, reference) in enumerate(zip(results, solo)):
        assert result["meta"]["batch"] == {"size": 3, "jobs": ids}
        assert result["prompt_id"] == ids[n] and result["meta"]["seeds"] == {"3": 501 + n}
        pixels = image_of(executor, result)
        assert np.abs(pixels - reference).max() <= 1, f"job {n} is more than 1/255 off its solo run"
        [image] = result["outputs"]["9"]["images"]
        texts = read_png_texts(executor.settings.output_dir / image["subfolder"] / image["filename"])
        prompt, _, fields = parse_parameters(texts["parameters"])
        assert image["filename"].startswith(f"batch{n}_") and prompt == jobs[n]["6"]["inputs"]["text"]
        assert fields["Seed"] == str(501 + n) and fields["Model hash"]
    assert "batch" not in results[3]["meta"]
    for events in followed[:3]:  # each job of the batch saw the shared sampler's steps as its own
        steps = [e.value for e in await collect(events) if e.kind == "progress" and e.node == "3"]
        assert steps == [0, 1, 2, 3, 4]


async def test_a_cancelled_batch_member_stops_the_batch_and_the_others_run_again(
        queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_gate = Gate(monkeypatch, seed=601)  # holds the batch, whose sampler seed is its first job's
    service = await queue_env.start(batch_max=4)
    held = await service.submit(queue_env.held(), Owner("cat"))
    await queue_env.gate.wait_entered()
    first, doomed, third = [await service.submit(txt2img(seed=seed, negative=f"cancel test {seed}"), user)
                            for seed, user in zip((601, 602, 603), USERS)]
    queue_env.gate.open()
    await batch_gate.wait_entered()
    assert await service.cancel(doomed.job_id) is True
    batch_gate.open()
    with pytest.raises(JobCancelled):
        await doomed.result(timeout=TIMEOUT)
    results = [await handle.result(timeout=TIMEOUT) for handle in (first, third)]
    assert [r["meta"]["batch"]["size"] for r in results] == [2, 2]  # batched again, without the cancelled one
    stored = rows(queue_env.db)
    assert [stored[h.job_id]["attempts"] for h in (first, third)] == [1, 1]  # the interrupted run did not count
    await held.result(timeout=TIMEOUT)
