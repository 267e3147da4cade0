"""Helpers for the queue's tests: a gate that holds one job in its sampler, and waiting on events with timeouts."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine import samplers
from engine.executor import Executor
from engine.queue.jobs import JobEvent

TIMEOUT = 120.0  # generous: a slow CI machine, never a synchronisation
GATE_SEED = 987_654_321


class Gate:
    """Holds the job (or the batch) whose sampler seed is `seed` after its first step until `open()`.

    With it the worker is busy for as long as a test needs, so what the test submits meanwhile is
    queued together: no sleeps, no races with a fast tiny model.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seed: int = GATE_SEED) -> None:
        self.seed = seed
        self.entered = threading.Event()
        self.released = threading.Event()
        original = samplers.sample

        def sample(plan: Any, eps_fn: Any, latent: Any, noise: Any, *, callback: Any = None, **options: Any) -> Any:
            if plan.seed != self.seed:
                return original(plan, eps_fn, latent, noise, callback=callback, **options)

            def held(index: int, total: int, x: Any) -> None:
                if callback is not None:
                    callback(index, total, x)  # reports step 1, and honours a cancel
                if index == 0:
                    self.entered.set()
                    if not self.released.wait(TIMEOUT):
                        raise RuntimeError("the test never opened the gate")

            return original(plan, eps_fn, latent, noise, callback=held, **options)

        monkeypatch.setattr(samplers, "sample", sample)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, TIMEOUT), "the gated job never reached its first step"

    def open(self) -> None:
        self.released.set()


async def next_event(events: AsyncIterator[JobEvent], *kinds: str, job_id: str | None = None) -> JobEvent:
    """The next event of one of `kinds` (of `job_id`, if given), within TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        async for event in events:
            if event.kind in kinds and (job_id is None or event.job_id == job_id):
                return event
    raise AssertionError(f"the stream ended before a {kinds} event")


async def collect(events: AsyncIterator[JobEvent]) -> list[JobEvent]:
    """Every event of a job's stream, until it ends."""
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in events]


def rows(db: Path) -> dict[str, dict[str, Any]]:
    """The engine's job rows, read with a connection of our own (as the bot would)."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {row["job_id"]: dict(row) for row in conn.execute("SELECT * FROM engine_jobs ORDER BY seq")}


def image_of(executor: Executor, result: dict[str, Any], node: str = "9") -> np.ndarray:
    [image] = result["outputs"][node]["images"]
    path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


class QueueEnv:
    """Services over one database in tmp_path, a gate, and a clean stop at the end of the test."""

    def __init__(self, executor: Executor, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.executor, self.db = executor, db
        self.gate = Gate(monkeypatch)
        self.services: list[Any] = []

    def held(self, **overrides: Any) -> dict[str, Any]:
        """A txt2img graph the gate holds; its own negative prompt keeps its sampler out of the output cache."""
        from tests.engine.conftest import txt2img

        return txt2img(**{"seed": GATE_SEED, "negative": f"held {uuid.uuid4().hex}", **overrides})

    async def start(self, executor: Executor | None = None, **settings: Any) -> Any:
        from engine.queue import EngineService
        from engine.settings import QueueSettings

        service = EngineService(executor or self.executor, self.db, QueueSettings(**settings))
        await service.start()
        self.services.append(service)
        return service

    async def close(self) -> None:
        self.gate.open()  # a failed test must not leave the worker held
        for service in self.services:
            await service.stop(timeout=TIMEOUT)
