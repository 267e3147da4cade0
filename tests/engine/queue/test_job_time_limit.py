"""[queue] job_time_limit_seconds: a job running past it is stopped like a cancel and fails with a message.

The limit counts from the job's start. The sampler checks it at every step and the executor before
every node, so a job held in its sampler stops at the next step, and one stuck in a long VAE decode
stops when the decode returns, before it writes a PNG; either way the next job runs.

The job table's clock is a fake the tests move: the limit runs out exactly when a test says, without
waiting for it, and never early on a slow machine.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from engine.errors import JobFailed
from engine.nodes.base import RunContext
from engine.nodes.vae import VAEDecode
from engine.queue import Owner, state_table
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, QueueEnv, collect, rows

LIMIT = 5.0  # seconds on the job table's clock
OVERTIME = re.compile(r"stopped after ([0-9.]+) s: the limit is 5 s \(\[queue\] job_time_limit_seconds in "
                      r"config\.toml\); use fewer steps or a smaller size")
ANN, CAT = Owner("ann"), Owner("cat")


class TableClock:
    """Stands in for the `time` module inside engine/queue/state_table.py: its monotonic clock moves only when
    a test advances it; wall time (the jobs' created_at) stays real."""

    time = staticmethod(time.time)

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> TableClock:
    fake = TableClock()
    monkeypatch.setattr(state_table, "time", fake)
    return fake


async def failed_for_time(handle: Any) -> float:
    """The seconds the job had run when it was stopped, read off its failure message."""
    with pytest.raises(JobFailed) as failed:
        await handle.result(timeout=TIMEOUT)
    match = OVERTIME.fullmatch(str(failed.value))
    assert match is not None, str(failed.value)
    return float(match[1])


async def test_a_job_held_in_its_sampler_past_the_limit_fails_at_the_next_step_and_the_next_job_runs(
        queue_env: QueueEnv, clock: TableClock) -> None:
    service = await queue_env.start(job_time_limit_seconds=LIMIT, batch_max=1)
    held = await service.submit(queue_env.held(steps=4), ANN)
    events = held.events()
    await queue_env.gate.wait_entered()
    after = await service.submit(txt2img(seed=211), CAT)
    clock.advance(LIMIT)  # the limit runs out while the gate holds the job at its first step
    queue_env.gate.open()

    assert await failed_for_time(held) >= LIMIT
    steps = [(e.value, e.max) for e in await collect(events) if e.kind == "progress" and e.node == "3"]
    assert steps[-1] == (2, 4)  # step 2 saw the limit: stopped, not run to the end
    stored = rows(queue_env.db)[held.job_id]
    assert stored["state"] == "failed" and OVERTIME.fullmatch(stored["error"])
    assert "outputs" in await after.result(timeout=TIMEOUT)
    assert rows(queue_env.db)[after.job_id]["state"] == "done"


async def test_jobs_stuck_in_a_long_vae_decode_fail_when_it_returns_each_by_its_own_limit(
        queue_env: QueueEnv, clock: TableClock, monkeypatch: pytest.MonkeyPatch) -> None:
    slow: set[str] = set()
    decode = VAEDecode.run

    def long_decode(node: VAEDecode, ctx: RunContext) -> Any:
        images = decode(node, ctx)
        if ctx.prompt_id in slow:
            clock.advance(LIMIT)  # in the worker thread: a decode that takes the whole limit, as a huge one would
        return images

    monkeypatch.setattr(VAEDecode, "run", long_decode)
    service = await queue_env.start(job_time_limit_seconds=LIMIT, batch_max=4)
    holder = await service.submit(queue_env.held(), CAT)
    await queue_env.gate.wait_entered()
    prefix = f"late-{uuid.uuid4().hex[:8]}"
    # two jobs that differ only in seeds: one sampler batch, then each decodes in turn
    late = [await service.submit(txt2img(seed=seed, filename_prefix=prefix), ANN) for seed in (221, 222)]
    slow.update(handle.job_id for handle in late)
    after = await service.submit(txt2img(seed=223, steps=3), CAT)  # other steps: not in their batch
    queue_env.gate.open()

    assert "outputs" in await holder.result(timeout=TIMEOUT)
    for handle in late:
        assert await failed_for_time(handle) >= LIMIT
        assert rows(queue_env.db)[handle.job_id]["state"] == "failed"
    output: Path = queue_env.executor.settings.output_dir
    assert not list(output.rglob(f"{prefix}*"))  # stopped before SaveImage: nothing written
    assert "outputs" in await after.result(timeout=TIMEOUT)


async def test_a_limit_of_zero_means_none(queue_env: QueueEnv) -> None:
    service = await queue_env.start(job_time_limit_seconds=0)
    handle = await service.submit(txt2img(seed=231), ANN)  # with "0 seconds" it would fail at its first node
    assert "outputs" in await handle.result(timeout=TIMEOUT)
