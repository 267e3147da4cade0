"""A cancel that lands after a stopped batch was settled but before its jobs went back in the queue: `cancel`
said yes, so the job ends cancelled instead of running with the next batch (on the real JobTable and SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.queue.job_store import JobStore
from engine.queue.jobs import JobEvent, JobState, Owner
from engine.queue.state_table import JobTable
from engine.settings import QueueSettings


def _table(path: Path, events: list[JobEvent]) -> JobTable:
    def prepare(workflow: dict[str, Any]) -> tuple[None, str, int]:
        return None, "one key", 4  # every job batches with every other

    table = JobTable(JobStore(path), QueueSettings(batch_max=4), prepare, events.append)
    table.resume()
    return table


def test_a_cancel_between_the_settle_and_the_requeue_stands(tmp_path: Path) -> None:
    events: list[JobEvent] = []
    table = _table(tmp_path / "noodle.sqlite3", events)
    ann = Owner("ann")
    for n in range(3):
        table.submit({"n": n}, ann, {})
    first, second, third = table.next_batch()
    assert table.cancel(first.job_id, ann)  # stops the batch; its mates go back
    table.finish(first, JobState.CANCELLED, error="cancelled while it was running")
    assert table.cancel(second.job_id, ann)  # the owner's next image: the batch already stopped
    table.requeue([second, third])
    assert table.get(second.job_id).state is JobState.CANCELLED
    assert any(e.job_id == second.job_id and e.kind == "cancelled" for e in events)
    assert [job.job_id for job in table.next_batch()] == [third.job_id]
    table.store.close()
    stored = JobStore(tmp_path / "noodle.sqlite3")  # what a restart reads
    assert stored.get(second.job_id).state is JobState.CANCELLED and stored.get(third.job_id).state is JobState.RUNNING
