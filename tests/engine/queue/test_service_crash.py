"""Crashes: a real child process running the service is killed with SIGKILL mid-queue; no job is lost.

The child (tests/engine/queue/crash_child.py) submits jobs, and its first running job hangs in its sampler, so the
kill lands while that job is stored as running. Markers on its stdout say when; every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.executor import Executor
from engine.queue import EngineService, JobFailed, JobState
from engine.settings import QueueSettings
from tests.engine.queue.service_support import TIMEOUT, QueueEnv, next_event, rows

pytestmark = pytest.mark.slow  # each test starts a child interpreter that loads torch and the tiny models

REPO = Path(__file__).resolve().parents[3]


class Child:
    """`python -m tests.engine.queue.crash_child`, its stdout read line by line on a thread of its own."""

    def __init__(self, db: Path, models: Path, out: Path, *args: str) -> None:
        self.log = out / f"child-{os.getpid()}-{len(list(out.glob('child-*')))}.log"
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.engine.queue.crash_child", str(db), str(models), str(out), *args],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, key: str) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no {key!r} from the child; its log:\n{self.log.read_text()[-3000:]}") from None
            if key in line:
                return line

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(timeout=TIMEOUT) == -signal.SIGKILL


async def resume(queue_env: QueueEnv, executor: Executor, ids: list[str]) -> tuple[EngineService, list[str]]:
    """A new service on the same database: the order jobs start in, until every job in `ids` ended."""
    service = EngineService(executor, queue_env.db, QueueSettings(batch_max=1))
    events = service.subscribe()  # before start: resumed jobs start at once
    await service.start()
    queue_env.services.append(service)
    started, ended = [], set()
    while not set(ids) <= ended:
        event = await next_event(events, "started", "done", "failed", "cancelled")
        if event.kind == "started":
            started.append(event.job_id)
        else:
            ended.add(event.job_id)
    return service, started


async def test_a_killed_engine_loses_no_job_and_runs_the_interrupted_one_again_first(
        queue_env: QueueEnv, executor: Executor, tiny_models: Path, tmp_path: Path) -> None:
    child = Child(queue_env.db, tiny_models, tmp_path / "child", "--submit", "4")
    submitted = child.wait_for("submitted")["submitted"]
    running = child.wait_for("running")
    child.kill()
    assert running["running"] == submitted[0]
    stored = rows(queue_env.db)
    assert [stored[i]["state"] for i in submitted] == ["running", "queued", "queued", "queued"]
    order = running["order"]  # the running job, then the queue in its fair order, as the child saw it

    service, started = await resume(queue_env, executor, submitted)
    assert started == order  # the cut-short job first, then the queue exactly as it was
    stored = rows(queue_env.db)
    assert {i: (stored[i]["state"], stored[i]["attempts"]) for i in submitted} == {
        submitted[0]: ("done", 2), **{i: ("done", 1) for i in submitted[1:]}}
    assert len(service.jobs(states=[JobState.DONE])) == 4


async def test_a_job_running_in_two_crashes_in_a_row_is_failed_with_a_message(
        queue_env: QueueEnv, executor: Executor, tiny_models: Path, tmp_path: Path) -> None:
    first = Child(queue_env.db, tiny_models, tmp_path / "child", "--submit", "3")
    submitted = first.wait_for("submitted")["submitted"]
    first.wait_for("running")
    first.kill()
    second = Child(queue_env.db, tiny_models, tmp_path / "child")  # resumes: the same job runs again, and hangs
    again = second.wait_for("running")
    second.kill()
    assert again["running"] == submitted[0] and rows(queue_env.db)[submitted[0]]["attempts"] == 2

    service, started = await resume(queue_env, executor, submitted)
    assert started == again["order"][1:]  # not a third time; the others in their order
    handle = service.handle(submitted[0])
    assert handle is not None
    with pytest.raises(JobFailed, match="stopped while this job was running, 2 times in a row.*submit it again"):
        await handle.result(timeout=TIMEOUT)
    stored = rows(queue_env.db)
    assert [stored[i]["state"] for i in submitted] == ["failed", "done", "done"]
