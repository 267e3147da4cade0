"""/queue's engine section: the workers, what each holds and runs, told to a member and to a moderator; the one
local worker as one short line; a running request's worker on its /queue line; the Discord and console answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from bot.console.commands import queue_command
from bot.core.front_end import Requester
from bot.core.services.queue import QueueEntry, RequestQueue
from bot.core.services.workers import EngineWorkers, WorkerView, append_section, short_checkpoint, workers_text
from bot.core.storage.records import NewGeneration
from bot.core.storage.store import Store
from bot.discord_app.cogs.queue import queue_answer
from engine.queue import JobInfo, JobState, Owner
from engine.queue.jobs import WorkerInfo
from tests.bot.conftest import Env

ALICE = Requester("42", "777", "alice")
BOB = Requester("43", "777", "bob")
MODERATOR = Requester("44", "777", "mod", can_manage_messages=True)
ELSEWHERE = Requester("45", "888", "mod-of-another-server", can_manage_messages=True)


class Workers:
    """An engine as far as /queue's engine section reads it: its workers, and the jobs of a user."""

    def __init__(self, workers: list[WorkerInfo], jobs: tuple[JobInfo, ...] = ()) -> None:
        self._workers, self._jobs = workers, list(jobs)

    def workers(self) -> list[WorkerInfo]:
        return self._workers

    def jobs(self, owner: Owner | None = None, states: Any = ()) -> list[JobInfo]:
        return [job for job in self._jobs if owner is None or job.owner == owner]


def _new(who: Requester, images: int = 1) -> NewGeneration:
    return NewGeneration(kind="imagine", front="discord", requester_id=who.user_id, request={"prompt": "a fox"},
                         params={"prompt": "a fox", "seed": 5}, model_name="tiny-sd15.safetensors",
                         images=[(5 + n, {"3": {"class_type": "KSampler", "inputs": {"seed": 5 + n}}})
                                 for n in range(images)], guild_id=who.guild_id, channel_id="555")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "noodle.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


async def request(store: Store, who: Requester, job_id: str) -> int:
    generation = await store.add(_new(who))
    await store.attach_job(generation.id, 1, job_id)
    return generation.id


def ray_workers() -> list[WorkerInfo]:
    return [
        WorkerInfo("vm-1", "box-a", "cuda:0 (NVIDIA H200)", "running", ("sd15/tiny-sd15.safetensors",), ("job-a",),
                   12, 3),
        WorkerInfo("vm-2", "box-b", "cuda:0 (NVIDIA H200)", "running", ("tiny-sdxl.safetensors", "tiny-sd15.ckpt"),
                   ("job-b",), 4, 2, joined=True),
        WorkerInfo("vm-3", "box-c", "cpu", "refused", (), (), 0, 0,
                   note="its models differ: tiny-sd15.safetensors has another hash"),
    ]


def test_a_checkpoint_is_shown_without_its_folder_and_file_ending() -> None:
    assert short_checkpoint("tiny-sd15.safetensors") == "tiny-sd15"
    assert short_checkpoint("sdxl/base-1.0.ckpt") == "base-1.0"
    assert short_checkpoint("sub\\model.SafeTensors") == "model"
    assert short_checkpoint("odd.name") == "odd.name"  # not a model file ending: kept whole


async def test_the_one_local_worker_is_one_short_line(store: Store) -> None:
    local = WorkerInfo("local", "this machine", "cpu", "idle", ("tiny-sd15.safetensors",), (), 0, 1)
    section = EngineWorkers(Workers([local]), store)  # type: ignore[arg-type]
    assert await section.text(ALICE) == "Engine: this machine (cpu) · holds tiny-sd15 · idle"
    # a moderator also sees the loads; the local worker does not count its jobs, so no "0 jobs done"
    assert await section.text(MODERATOR) == "Engine: this machine (cpu) · holds tiny-sd15 · idle · 1 checkpoint load"
    empty = WorkerInfo("local", "this machine", "cpu", "idle", (), (), 0, 0)
    assert workers_text([WorkerView.of(empty)]) == "Engine: this machine (cpu) · holds nothing · idle"


async def test_a_running_request_is_named_only_to_who_may_moderate_it(store: Store) -> None:
    mine = await request(store, ALICE, "job-a")
    bobs = await request(store, BOB, "job-b")
    section = EngineWorkers(Workers(ray_workers()), store)  # type: ignore[arg-type]

    alice = (await section.text(ALICE)).splitlines()
    assert alice[0] == "Engine workers (2 of 3 up):"
    assert alice[1] == f"- vm-1 · cuda:0 (NVIDIA H200) · holds tiny-sd15 · running #{mine}"
    assert alice[2] == "- vm-2 (joined) · cuda:0 (NVIDIA H200) · holds tiny-sdxl, tiny-sd15 · running"
    assert alice[3] == "- vm-3 · cpu · holds nothing · refused"  # the note is the admin view's
    assert f"#{bobs}" not in "\n".join(alice) and "box-" not in "\n".join(alice) and "jobs done" not in alice[1]

    moderator = (await section.text(MODERATOR)).splitlines()
    assert moderator[1] == (f"- vm-1 on box-a · cuda:0 (NVIDIA H200) · holds tiny-sd15 · running #{mine} · "
                            "3 checkpoint loads, 12 jobs done")
    assert moderator[2].startswith(f"- vm-2 on box-b (joined) · cuda:0 (NVIDIA H200) · holds tiny-sdxl, tiny-sd15 · "
                                   f"running #{bobs} · 2 checkpoint loads")
    assert moderator[3] == ("- vm-3 on box-c · cpu · holds nothing · refused: its models differ: "
                            "tiny-sd15.safetensors has another hash · 0 checkpoint loads, 0 jobs done")

    # Manage Messages counts in the moderator's own server only: another server's requests stay unnamed
    elsewhere = await section.text(ELSEWHERE)
    assert f"#{mine}" not in elsewhere and f"#{bobs}" not in elsewhere and "running ·" in elsewhere


async def test_a_batch_is_named_once_and_others_are_counted(store: Store) -> None:
    mine = await store.add(_new(ALICE, images=2))
    await store.attach_job(mine.id, 1, "job-1")
    await store.attach_job(mine.id, 2, "job-2")
    bobs = await request(store, BOB, "job-3")
    busy = WorkerInfo("vm-1", "box-a", "cpu", "running", (), ("job-1", "job-2", "job-3", "not-a-request"), 0, 0)
    section = EngineWorkers(Workers([busy]), store)  # type: ignore[arg-type]
    [alices] = await section.views(ALICE)
    assert alices.requests == (mine.id,) and alices.others == 2  # her two images once; Bob's and another program's
    [view] = await section.views(BOB)
    assert view.requests == (bobs,) and view.others == 2  # Alice's batch counts once, as does the foreign job
    assert view.line().endswith(f"running #{bobs} and 2 other requests")


def test_no_workers_yet_says_so() -> None:
    assert workers_text([]) == "Engine: no workers yet (starting)."


def test_the_workers_give_way_to_the_callers_own_list() -> None:
    own = "x" * 1990
    assert append_section(own, "Engine: this machine (cpu) · holds tiny-sd15 · idle", 2000) == own
    section = "Engine workers (2):\n- vm-1 · cpu · idle\n- vm-2 · cpu · idle"
    assert append_section("mine", section, 2000) == f"mine\n\n{section}"
    fitted = append_section("y" * 1950, section, 2000)  # the heading and the first worker fit, not the second
    assert len(fitted) <= 2000 and fitted.endswith("- vm-1 · cpu · idle")
    assert append_section("z" * 2100, section, 2000) == "z" * 2000


async def test_a_running_entry_names_its_worker_when_there_are_several(store: Store) -> None:
    generation = await request(store, ALICE, "job-a")
    running = JobInfo("job-a", Owner(ALICE.user_id, ALICE.guild_id), JobState.RUNNING, None, None,
                      {"generation_id": generation}, 0.0, None, None, 1, worker="vm-2")
    several = RequestQueue(Workers(ray_workers(), (running,)), store, front="discord",  # type: ignore[arg-type]
                           per_user_max=8)
    [entry] = await several.entries(ALICE)
    assert entry.worker == "vm-2" and entry.line().endswith("· running on vm-2")
    one = RequestQueue(Workers(ray_workers()[:1], (running,)), store, front="discord",  # type: ignore[arg-type]
                       per_user_max=8)
    [entry] = await one.entries(ALICE)
    assert entry.worker is None and entry.line().endswith("· running")
    # other callers of QueueEntry keep working without a worker
    assert QueueEntry(7, "imagine", "a fox", 1, False, 2, None).line() == '#7 imagine · "a fox" · queued, position 2'


async def test_queue_through_the_studio_shows_the_local_engine(env: Env) -> None:
    text, view = await queue_answer(env.studio, ALICE)
    assert view is None and text.startswith("Nothing of yours is queued or running.")
    [engine_line] = [line for line in text.splitlines() if line.startswith("Engine: ")]
    assert engine_line.startswith("Engine: this machine (cpu) · holds ") and engine_line.endswith("idle")
    console = await queue_command(env.studio, ALICE, "")
    assert "Nothing of yours" in console and "\n\nEngine: this machine (cpu)" in console
