"""The local worker gives the CPU heap's kept memory back once the queue has been quiet a while (engine/heap.py),
and not while jobs keep coming: a burst keeps the memory that makes its steps fast."""

from __future__ import annotations

import asyncio

import pytest

from engine.queue import Owner
from engine.queue import worker as worker_module
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, QueueEnv

ANN = Owner("ann")


async def test_a_quiet_queue_returns_the_heap_and_a_busy_one_does_not(
        queue_env: QueueEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(worker_module, "return_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(worker_module.Worker, "idle_seconds", 0.5)
    service = await queue_env.start(batch_max=1)

    held = await service.submit(queue_env.held(), ANN)
    await queue_env.gate.wait_entered()
    trims.clear()  # the worker's own start found an empty queue: it may have trimmed before the first job
    waiting = [await service.submit(txt2img(seed=seed), ANN) for seed in (401, 402, 403)]
    await asyncio.sleep(1.0)  # twice the idle time, with jobs queued behind the held one
    queue_env.gate.open()
    for job in (held, *waiting):
        await job.result(timeout=TIMEOUT)
    assert trims == []  # back to back: the memory stayed for the next job

    await asyncio.sleep(1.5)
    assert trims  # quiet for longer than idle_seconds: given back
