"""The engine's jobs on a real local Ray cluster: routing, a worker killed mid-job, cancel and the time limit on a
remote worker, and a restart of the bot with jobs queued. Every wait has a timeout; nothing sleeps to wait."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.queue import JobCancelled, JobFailed, JobState, Owner
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, next_event, rows

pytestmark = pytest.mark.slow  # a Ray cluster, and worker processes that import torch

LONG = 150  # sampler steps: over a second on the tiny model, long enough to act on a job that runs


def pixels(root: Path, result: dict[str, Any]) -> np.ndarray:
    [image] = result["outputs"]["9"]["images"]
    return np.asarray(Image.open(root / image["subfolder"] / image["filename"]).convert("RGB"))


async def until(check: Any, what: str) -> None:
    """Poll `check()` (cheap, on the loop) until true, within TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while not check():
            await asyncio.sleep(0.05)
    assert check(), what


async def test_jobs_go_to_the_worker_holding_their_checkpoint(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=2)
    assert [w.state for w in service.workers()] == ["idle", "idle"]
    first = {}
    for checkpoint in ("tiny-sd15.safetensors", "tiny-sd15-b.safetensors"):
        job = await service.submit(txt2img(checkpoint=checkpoint, seed=1), Owner("u1"))
        first[checkpoint] = (await job.result(TIMEOUT))["meta"]["worker"]
    assert first["tiny-sd15.safetensors"]["name"] != first["tiny-sd15-b.safetensors"]["name"]
    assert {w.holds for w in service.workers()} == {("tiny-sd15.safetensors",), ("tiny-sd15-b.safetensors",)}

    for checkpoint in ("tiny-sd15-b.safetensors", "tiny-sd15.safetensors"):  # the other order: routing, not turns
        job = await service.submit(txt2img(checkpoint=checkpoint, seed=2, prompt="a cat"), Owner("u1"))
        result = await job.result(TIMEOUT)
        worker = result["meta"]["worker"]
        assert worker["name"] == first[checkpoint]["name"]
        assert worker["reason"].startswith(f"holds {checkpoint}")
        # the file came back as bytes into the bot's own output folder: the in-process engine's picture (within
        # rounding: a worker runs torch on its one CPU slot's thread, this process on two)
        local = cluster_env.executor.run(txt2img(checkpoint=checkpoint, seed=2, prompt="a cat",
                                                 filename_prefix="local"))
        out = cluster_env.executor.settings.output_dir
        difference = np.abs(pixels(out, result).astype(int) - pixels(out, local.to_dict()))
        assert difference.max() <= 2, difference.max()
    assert sum(w.loads for w in service.workers()) == 2  # each checkpoint loaded once, on one worker


async def test_compatible_jobs_batch_on_the_worker_they_go_to(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=1)
    busy = await service.submit(txt2img(steps=LONG, seed=5, negative="long"), Owner("u0"))
    await next_event(busy.events(), "progress")
    jobs = [await service.submit(txt2img(seed=10 + n), Owner(f"u{n}")) for n in range(3)]
    results = [await job.result(TIMEOUT) for job in jobs]
    assert [r["meta"]["batch"]["size"] for r in results] == [3, 3, 3]
    assert "batched with" in results[1]["meta"]["worker"]["reason"]
    await busy.result(TIMEOUT)


async def test_a_worker_killed_mid_job_costs_no_job(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=2)
    job = await service.submit(txt2img(steps=LONG, seed=7, negative="killed"), Owner("u1"))
    await next_event(job.events(), "progress")
    [running] = [w for w in service.workers() if w.running == (job.job_id,)]
    runner = service._runner
    victim = next(w for w in runner._workers if w.name == running.name)
    os.kill(victim.facts.pid, signal.SIGKILL)

    result = await job.result(TIMEOUT)
    assert result["meta"]["worker"]["name"] != running.name  # it ran once more, elsewhere
    assert rows(cluster_env.db)[job.job_id]["attempts"] == 2
    await until(lambda: sum(w.state in ("idle", "running") for w in service.workers()) == 2,
                "a new worker replaced the killed one")
    assert running.name not in [w.name for w in service.workers()]
    again = await service.submit(txt2img(seed=8), Owner("u2"))  # and the queue serves on
    assert (await again.result(TIMEOUT))["outputs"]


async def test_a_job_killed_twice_fails_with_why(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=2)
    events = service.subscribe()  # every event from now on: each run's own "started", then its first step
    job = await service.submit(txt2img(steps=LONG, seed=9, negative="killed twice"), Owner("u1"))
    for _ in range(2):
        await next_event(events, "started", job_id=job.job_id)
        await next_event(events, "progress", job_id=job.job_id)
        name = next(w.name for w in service.workers() if w.running == (job.job_id,))
        os.kill(next(w.facts.pid for w in service._runner._workers if w.name == name), signal.SIGKILL)
    with pytest.raises(JobFailed, match=r"died while running this job, the second time it ran"):
        await job.result(TIMEOUT)


async def test_cancel_and_the_time_limit_reach_a_remote_worker(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=1)
    job = await service.submit(txt2img(steps=LONG, seed=11, negative="cancel me"), Owner("u1"))
    await next_event(job.events(), "progress")
    assert await service.cancel(job.job_id, Owner("u1"))
    with pytest.raises(JobCancelled, match="while it was running"):
        await job.result(TIMEOUT)
    await service.stop(timeout=TIMEOUT)

    limited = await cluster_env.start(workers=1, queue={"job_time_limit_seconds": 0.3})
    slow = await limited.submit(txt2img(steps=LONG, seed=12, negative="too slow"), Owner("u1"))
    with pytest.raises(JobFailed, match=r"stopped after .* the limit is 0.3 s"):
        await slow.result(TIMEOUT)
    assert [w.state for w in limited.workers()] == ["idle"]  # the worker lives on


async def test_a_restart_of_the_bot_keeps_the_queued_jobs(cluster_env: Any) -> None:
    service = await cluster_env.start(workers=1)
    running = await service.submit(txt2img(steps=LONG, seed=13, negative="put back"), Owner("u1"))
    await next_event(running.events(), "progress")
    queued = [await service.submit(txt2img(seed=20 + n), Owner(f"u{n}")) for n in range(3)]
    await service.stop(timeout=TIMEOUT)
    stored = rows(cluster_env.db)
    assert {stored[j.job_id]["state"] for j in [running, *queued]} == {JobState.QUEUED.value}

    again = await cluster_env.start(workers=1)
    for job in [running, *queued]:
        handle = again.handle(job.job_id)
        assert handle is not None
        assert (await handle.result(TIMEOUT))["outputs"]


@pytest.mark.parametrize("files", ["bytes", "shared"])
async def test_an_input_image_reaches_the_worker_and_its_result_comes_back(cluster_env: Any, files: str) -> None:
    source = cluster_env.executor.settings.input_dir / "uploads" / "fox.png"
    source.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(source)
    service = await cluster_env.start(workers=1, files=files)
    job = await service.submit(txt2img(init_image="uploads/fox.png", denoise=0.6, seed=40), Owner("u1"))
    result = await job.result(TIMEOUT)
    local = cluster_env.executor.run(txt2img(init_image="uploads/fox.png", denoise=0.6, seed=40,
                                             filename_prefix="local"))
    out = cluster_env.executor.settings.output_dir
    assert np.abs(pixels(out, result).astype(int) - pixels(out, local.to_dict())).max() <= 2


async def test_a_joined_worker_still_starting_holds_up_no_time_limit(cluster_env: Any) -> None:
    """The watch thread brought joined workers up itself, waiting for each to start (up to 10 minutes): while a
    machine joined, a job past its time limit ran on to the end (3.5 s of a 1 s limit) and a cancel waited."""
    from engine.cluster import pool
    from engine.settings import ModelsSettings, RaySettings

    service = await cluster_env.start(workers=1, queue={"job_time_limit_seconds": 0.3}, join_poll_seconds=0.1)
    executor = cluster_env.executor
    [spec] = pool.owned_specs(["late"], ModelsSettings(dir=cluster_env.models), executor.settings, executor.limits,
                              RaySettings())
    # registered, but Ray cannot place it (it asks for 64 CPUs): as a machine still importing torch looks
    pending = pool.start_actor(spec, RaySettings(cpus_per_worker=64), name=pool.JOINED_PREFIX + "late")
    try:
        await asyncio.sleep(0.5)  # the watch loop has found it and is bringing it up
        slow = await service.submit(txt2img(steps=LONG, seed=21, negative="too slow"), Owner("u1"))
        with pytest.raises(JobFailed, match=r"stopped after .* the limit is 0.3 s"):
            await slow.result(TIMEOUT)  # the loop that passes the limit on also passes cancels and pings
    finally:
        import ray

        ray.kill(pending)


async def test_a_worker_still_running_an_earlier_bots_batch_fails_no_job(cluster_env: Any) -> None:
    """A `noodle worker` outlives a bot that died and runs on with its batch; the new bot saw it idle, and each job
    routed to it failed at once with 'running a batch already'. Now they wait and run when it is free."""
    from engine.cluster.actor import WireJob

    service = await cluster_env.start(workers=1)
    [worker] = service._runner._workers
    orphan = worker.handle.run.options(num_returns="streaming").remote(
        [WireJob("earlier-bot", txt2img(steps=LONG, seed=31, negative="an earlier bot's"))])
    await asyncio.sleep(0.5)  # it is running the orphan batch now
    job = await service.submit(txt2img(seed=32), Owner("u1"))
    result = await job.result(TIMEOUT)  # was JobFailed: could not run on engine worker ...: running a batch already
    assert result["outputs"]["9"]["images"]
    assert rows(cluster_env.db)[job.job_id]["attempts"] == 1  # put back, not counted as a try
    for ref in orphan:  # (the orphan batch's own stream, drained)
        pass


async def test_the_bot_starts_serving_while_a_joined_worker_is_still_starting(cluster_env: Any) -> None:
    """start() brought the joined workers up itself, waiting for each to start (up to pool.READY_TIMEOUT_S, 10
    minutes): a machine still importing torch when the bot restarted held every job up that long."""
    import time

    import ray

    from engine.cluster import pool
    from engine.settings import ModelsSettings, RaySettings

    executor = cluster_env.executor
    [spec] = pool.owned_specs(["late"], ModelsSettings(dir=cluster_env.models), executor.settings, executor.limits,
                              RaySettings())
    # registered before the bot starts, but Ray cannot place it (it asks for 64 CPUs)
    pending = pool.start_actor(spec, RaySettings(cpus_per_worker=64), name=pool.JOINED_PREFIX + "late")
    try:
        begun = time.monotonic()
        service = await cluster_env.start(workers=1, join_poll_seconds=0.1)
        assert time.monotonic() - begun < TIMEOUT  # the join wait is 10 s; it was READY_TIMEOUT_S (600 s)
        result = await (await service.submit(txt2img(seed=23), Owner("u1"))).result(TIMEOUT)
        assert result["meta"]["worker"]["name"] != "late"
    finally:
        ray.kill(pending)
