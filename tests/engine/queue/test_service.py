"""The engine service on the tiny models: storing, events, fair order, caps, cancel, failures, model cache meta."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from engine.device import memory_budget, usable_ram
from engine.errors import JobCancelled, JobFailed, NodeExecutionError, QueueFull, WorkflowInvalid
from engine.nodes.latents import EmptyLatentImage
from engine.nodes.vae import VAEDecode
from engine.queue import EngineService, JobState, Owner
from engine.queue.state_table import JobTable
from engine.queue.worker import is_out_of_memory, message_for
from engine.executor import create_executor
from engine.settings import EngineSettings, Limits, ModelsSettings, QueueSettings
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, QueueEnv, collect, rows

ANN, BOB, CAT = Owner("ann", "guild"), Owner("bob", "guild"), Owner("cat")


async def test_a_job_is_stored_before_submit_returns_and_its_events_run_to_done(queue_env: QueueEnv) -> None:
    service = await queue_env.start()
    everything = service.subscribe()
    handle = await service.submit(txt2img(seed=1), ANN, extra={"channel_id": 5})
    stored = rows(queue_env.db)[handle.job_id]
    assert stored["user_id"] == "ann" and stored["guild_id"] == "guild" and stored["extra"] == '{"channel_id": 5}'
    assert stored["state"] in ("queued", "running", "done")

    result = await handle.result(timeout=TIMEOUT)
    events = []
    async with asyncio.timeout(TIMEOUT):
        async for event in everything:
            events.append(event)
            if event.final:
                break
    assert [e.kind for e in events][:2] == ["queued", "started"] and events[0].position == 1
    steps = [e.value for e in events if e.kind == "progress" and e.node == "3"]
    assert steps == [0, 1, 2, 3, 4] and all(e.max == 4 for e in events if e.node == "3")
    assert events[-1].kind == "done" and events[-1].result == result
    assert set(result) == {"prompt_id", "outputs", "meta"} and result["meta"]["seeds"] == {"3": 1}
    assert {"hits", "misses", "evictions", "load_seconds"} <= set(result["meta"]["models"])

    # a follower who comes late is told the latest state only, and the stream ends
    assert [e.kind for e in await collect(handle.events())] == ["done"]
    stored = rows(queue_env.db)[handle.job_id]
    assert stored["state"] == "done" and stored["attempts"] == 1 and '"outputs"' in stored["result"]
    [info] = service.jobs(ANN, states=[JobState.DONE])
    assert info.job_id == handle.job_id and info.extra == {"channel_id": 5} and info.result == result


async def test_an_invalid_workflow_is_refused_before_anything_is_stored(queue_env: QueueEnv) -> None:
    service = await queue_env.start()
    with pytest.raises(WorkflowInvalid, match="steps"):
        await service.submit(txt2img(steps=100_000), ANN)
    assert rows(queue_env.db) == {} and service.jobs() == []


async def test_caps_refuse_extra_jobs_naming_the_limit_and_the_users_jobs(queue_env: QueueEnv) -> None:
    service = await queue_env.start(per_user_max=2, global_max=3)
    held = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    first = await service.submit(txt2img(seed=1), ANN)
    second = await service.submit(txt2img(seed=2), ANN)
    with pytest.raises(QueueFull) as refused:
        await service.submit(txt2img(seed=3), ANN)
    message = str(refused.value)
    assert "queue.per_user_max = 2" in message and "you already have 2 jobs" in message
    assert f"{first.job_id[:8]} (queued, position 1)" in message and second.job_id[:8] in message
    with pytest.raises(QueueFull, match=r"queue.global_max = 3.*none of them is yours"):
        await service.submit(txt2img(seed=4), BOB)
    assert len(rows(queue_env.db)) == 3

    queue_env.gate.open()
    for handle in (held, first, second):
        await handle.result(timeout=TIMEOUT)
    await (await service.submit(txt2img(seed=5), ANN)).result(timeout=TIMEOUT)  # room again


async def test_jobs_run_round_robin_across_users_with_positions_and_etas(queue_env: QueueEnv) -> None:
    service = await queue_env.start(batch_max=1)
    everything = service.subscribe()
    held = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    a1, a2, a3 = [await service.submit(txt2img(seed=n), ANN) for n in (11, 12, 13)]
    b1 = await service.submit(txt2img(seed=21), BOB)

    assert [h.position() for h in (a1, b1, a2, a3)] == [1, 2, 3, 4]  # bob's one job is not behind ann's three
    listed = service.jobs()
    assert [i.job_id for i in listed] == [held.job_id, a1.job_id, b1.job_id, a2.job_id, a3.job_id]
    assert listed[0].state is JobState.RUNNING and listed[0].position is None
    etas = [i.eta_s for i in listed[1:]]
    assert None not in etas and etas == sorted(etas)  # the held job's first step set the step rate
    assert [i.job_id for i in service.jobs(BOB)] == [b1.job_id]

    queue_env.gate.open()
    started, told = [], {}
    async with asyncio.timeout(TIMEOUT):
        async for event in everything:
            if event.kind == "started":
                started.append(event.job_id)
            elif event.kind in ("queued", "position"):
                told.setdefault(event.job_id, []).append(event.position)
            elif event.final and event.job_id == a3.job_id:
                break
    assert started == [held.job_id, a1.job_id, b1.job_id, a2.job_id, a3.job_id]
    assert told[a2.job_id] == [2, 3, 2, 1]  # bob's job went ahead of it, then each start moved it up


async def test_cancelling_a_queued_job_removes_it_and_it_never_runs(queue_env: QueueEnv) -> None:
    service = await queue_env.start()
    held = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    doomed = await service.submit(txt2img(seed=30, steps=5), ANN)
    after = await service.submit(txt2img(seed=31), BOB)
    assert await service.cancel(doomed.job_id, by=BOB) is False  # only its owner, or a moderator (by=None)
    assert await service.cancel(doomed.job_id, by=ANN) is True
    assert await service.cancel(doomed.job_id) is False  # gone already
    with pytest.raises(JobCancelled, match="by ann while it was queued"):
        await doomed.result(timeout=TIMEOUT)
    assert [e.kind for e in await collect(doomed.events())] == ["cancelled"]
    assert after.position() == 1

    queue_env.gate.open()
    await held.result(timeout=TIMEOUT)
    await after.result(timeout=TIMEOUT)
    stored = rows(queue_env.db)[doomed.job_id]
    assert stored["state"] == "cancelled" and stored["attempts"] == 0  # it never started


async def test_cancelling_a_running_job_stops_it_at_the_next_step_and_the_next_job_runs(queue_env: QueueEnv) -> None:
    service = await queue_env.start()
    held = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    after = await service.submit(txt2img(seed=41), BOB)
    events = held.events()  # replays "started" and the latest progress
    assert await service.cancel(held.job_id) is True
    queue_env.gate.open()
    seen = await collect(events)
    sampler_steps = [e.value for e in seen if e.kind == "progress" and e.node == "3"]
    assert seen[-1].kind == "cancelled" and "while it was running" in (seen[-1].error or "")
    assert sampler_steps[-1] == 2 and seen[-1].kind != "done"  # stopped at the step after the cancel, of 4
    with pytest.raises(JobCancelled):
        await held.result(timeout=TIMEOUT)
    assert "outputs" in await after.result(timeout=TIMEOUT)
    assert rows(queue_env.db)[held.job_id]["state"] == "cancelled"


async def test_out_of_memory_frees_the_model_cache_and_fails_only_that_job(
        queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await queue_env.start(batch_max=1)
    models = queue_env.executor.models
    unloads, decode = [], VAEDecode.run

    def run(self: VAEDecode, ctx):  # type: ignore[no-untyped-def]
        if ctx.prompt_id == victim_id[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return decode(self, ctx)

    def unload_all() -> None:
        unloads.append(models.loaded_names())
        real_unload()

    victim_id: list[str] = [""]
    real_unload = models.unload_all
    monkeypatch.setattr(VAEDecode, "run", run)
    monkeypatch.setattr(models, "unload_all", unload_all)
    held = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    victim = await service.submit(txt2img(seed=50), ANN)
    victim_id[0] = victim.job_id
    survivor = await service.submit(txt2img(seed=51), BOB)
    queue_env.gate.open()

    with pytest.raises(JobFailed) as failed:
        await victim.result(timeout=TIMEOUT)
    assert "the GPU ran out of memory while running node 8 (VAEDecode)" in str(failed.value)
    assert "try a smaller size or batch" in str(failed.value)
    assert len(unloads) == 1 and "tiny-sd15.safetensors" in unloads[0]  # what was loaded then, freed
    result = await survivor.result(timeout=TIMEOUT)
    assert result["meta"]["models"]["misses"] == 1  # the freed checkpoint was loaded again
    await held.result(timeout=TIMEOUT)


async def test_an_exception_in_a_node_fails_only_that_job(queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await queue_env.start()
    original = EmptyLatentImage.run

    def run(self: EmptyLatentImage, ctx):  # type: ignore[no-untyped-def]
        if self.width == 72:
            raise ValueError("boom")
        return original(self, ctx)

    monkeypatch.setattr(EmptyLatentImage, "run", run)
    broken = await service.submit(txt2img(seed=60, width=72), ANN)
    fine = await service.submit(txt2img(seed=61), ANN)
    with pytest.raises(JobFailed, match=r"node 5 \(EmptyLatentImage\) failed: boom"):
        await broken.result(timeout=TIMEOUT)
    assert "outputs" in await fine.result(timeout=TIMEOUT)
    assert rows(queue_env.db)[broken.job_id]["error"] == "node 5 (EmptyLatentImage) failed: boom"


async def test_a_corrupt_checkpoint_fails_its_job_with_a_message_and_the_next_job_runs(
        queue_env: QueueEnv, tiny_models: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    good = tiny_models / "checkpoints" / "tiny-sd15.safetensors"
    shutil.copy(good, models / "checkpoints" / "tiny-sd15.safetensors")
    (models / "checkpoints" / "broken.safetensors").write_bytes(good.read_bytes()[: 200_000])  # cut off
    executor = create_executor(ModelsSettings(dir=models), EngineSettings(
        output_dir=queue_env.executor.settings.output_dir, device="cpu"), Limits())
    service = await queue_env.start(executor)
    broken = await service.submit(txt2img(seed=70, checkpoint="broken.safetensors"), ANN)
    fine = await service.submit(txt2img(seed=71), ANN)
    with pytest.raises(JobFailed) as failed:
        await broken.result(timeout=TIMEOUT)
    assert "node 4 (CheckpointLoaderSimple) failed" in str(failed.value)
    assert "broken.safetensors" in str(failed.value) and "truncated" in str(failed.value)
    assert "outputs" in await fine.result(timeout=TIMEOUT)


async def test_model_cache_meta_reports_this_jobs_hits_misses_evictions_and_loads(
        queue_env: QueueEnv, tiny_models: Path) -> None:
    # a budget of one byte keeps one checkpoint at a time: every switch evicts
    executor = create_executor(ModelsSettings(dir=tiny_models), EngineSettings(
        output_dir=queue_env.executor.settings.output_dir, device="cpu", model_memory_bytes=1), Limits())
    service = await queue_env.start(executor, batch_max=1)
    names = ["tiny-sd15.safetensors", "tiny-sd15-b.safetensors", "tiny-sd15.safetensors", "tiny-sd15.safetensors"]
    handles = [await service.submit(txt2img(seed=80 + n, checkpoint=name), ANN) for n, name in enumerate(names)]
    metas = [(await h.result(timeout=TIMEOUT))["meta"]["models"] for h in handles]
    counts = [(m["hits"], m["misses"], m["evictions"]) for m in metas]
    assert counts == [(0, 1, 0), (0, 1, 1), (0, 1, 1), (1, 0, 0)]
    assert metas[0]["load_seconds"] > 0 and metas[3]["load_seconds"] == 0
    assert metas[3]["loaded"] == ["tiny-sd15.safetensors"]


async def test_switching_loras_does_not_reload_the_checkpoint(queue_env: QueueEnv) -> None:
    service = await queue_env.start(batch_max=1)
    loras = [(("tiny-lora-a.safetensors", 1.0, 1.0),), (("tiny-lora-b.safetensors", 0.8, 0.8),), ()]
    handles = [await service.submit(txt2img(seed=90 + n, loras=l), ANN) for n, l in enumerate(loras)]
    metas = [(await h.result(timeout=TIMEOUT))["meta"]["models"] for h in handles]
    assert [m["misses"] for m in metas[1:]] == [0, 0] and all(m["hits"] >= 1 for m in metas[1:])
    assert all(m["lora_switches"] >= 1 for m in metas[1:])
    assert "tiny-lora-b.safetensors" in metas[1]["loras"]


async def test_stop_puts_the_running_job_back_and_the_next_start_runs_it(
        queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    told_to_stop = asyncio.Event()
    table_stop = JobTable.stop

    def stop(table: JobTable) -> None:
        table_stop(table)
        told_to_stop.set()  # on the loop: EngineService.stop calls it before its first await

    monkeypatch.setattr(JobTable, "stop", stop)
    first = await queue_env.start()
    held = await first.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    waiting = await first.submit(txt2img(seed=100), ANN)
    stopping = asyncio.create_task(first.stop(timeout=TIMEOUT))
    # the gate opens only once the job table is stopping, so the held job sees the stop at its next step
    await asyncio.wait_for(told_to_stop.wait(), TIMEOUT)
    queue_env.gate.open()
    await asyncio.wait_for(stopping, TIMEOUT)
    stored = rows(queue_env.db)
    assert (stored[held.job_id]["state"], stored[held.job_id]["attempts"]) == ("queued", 0)  # not a crash
    assert stored[waiting.job_id]["state"] == "queued"

    second = await queue_env.start()
    for job_id in (held.job_id, waiting.job_id):
        resumed = second.handle(job_id)
        assert resumed is not None and resumed.owner in (CAT, ANN)
        await resumed.result(timeout=TIMEOUT)
    assert rows(queue_env.db)[held.job_id]["attempts"] == 1


def test_out_of_memory_is_recognised_however_it_is_wrapped() -> None:
    cpu = torch.device("cpu")
    wrapped = NodeExecutionError("3", "KSampler", RuntimeError("DefaultCPUAllocator: out of memory"))
    assert is_out_of_memory(wrapped) and is_out_of_memory(MemoryError())
    assert message_for(wrapped, cpu).startswith("the machine ran out of memory while running node 3 (KSampler)")
    assert not is_out_of_memory(NodeExecutionError("3", "KSampler", ValueError("bad value")))
    assert "try again" in message_for(KeyError("x"), cpu)


def test_the_automatic_model_budget_is_half_the_usable_ram_within_a_container_limit(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    assert usable_ram([limit]) == 1024**3
    limit.write_text("max\n")  # cgroup v2's "no limit"
    assert usable_ram([limit]) == usable_ram([])
    budget = memory_budget(torch.device("cpu"))
    assert budget == usable_ram() // 2 and budget > 0
    assert memory_budget(torch.device("cpu"), 12345) == 12345


async def test_a_service_must_be_started_first(queue_env: QueueEnv) -> None:
    service = EngineService(queue_env.executor, queue_env.db, QueueSettings())
    with pytest.raises(RuntimeError, match="start"):
        await service.submit(txt2img(), ANN)


async def test_a_finished_job_is_still_known_after_a_restart(queue_env: QueueEnv) -> None:
    service = await queue_env.start()
    handle = await service.submit(txt2img(seed=31), ANN, extra={"generation_id": 7})
    result = await handle.result(timeout=TIMEOUT)
    await service.stop()
    again = await queue_env.start()
    assert again.jobs() == []  # nothing active to resume
    info = await again.info(handle.job_id)
    assert info is not None and info.state == JobState.DONE
    assert info.result["outputs"] == result["outputs"] and info.extra == {"generation_id": 7}
    assert await again.info("no-such-job") is None


async def test_stream_and_result_waits_go_through_the_idle_seam_and_behave_the_same(queue_env: QueueEnv) -> None:
    from collections.abc import Awaitable
    from typing import Any

    from engine.idle import idle_waits_through

    service = await queue_env.start()
    declared: list[Awaitable[Any]] = []

    async def external_wait(awaitable: Awaitable[Any]) -> Any:  # what SimCord's env.external_wait would be
        declared.append(awaitable)
        return await awaitable

    with idle_waits_through(external_wait):
        handle = await service.submit(txt2img(seed=3), ANN)
        events = await collect(handle.events())
        result = await handle.result(timeout=TIMEOUT)
    assert events[-1].kind == "done" and events[-1].result == result and "outputs" in result
    assert len(declared) >= len(events) + 1  # each event taken off the stream, and the result's wait
    count = len(declared)
    await collect(handle.events())
    assert len(declared) == count  # outside the block nothing is wrapped


async def test_a_second_engine_on_the_same_database_is_refused_until_the_first_stops(queue_env: QueueEnv) -> None:
    # a second engine took the first one's running job for one a crash left behind and ran every job twice
    from engine.errors import EngineBusy

    first = await queue_env.start()
    handle = await first.submit(txt2img(seed=61), Owner("ann"))
    second = EngineService(queue_env.executor, queue_env.db, QueueSettings())
    with pytest.raises(EngineBusy, match="another Noodle engine is running on .*give this one its own database"):
        await second.start()
    assert (await asyncio.wait_for(handle.result(), TIMEOUT))["outputs"]
    await first.stop(timeout=TIMEOUT)
    await second.start()  # the lock went with the first engine (and with its process, however that ends)
    queue_env.services.append(second)
    assert [row["state"] for row in rows(queue_env.db).values()] == ["done"]
