"""The queue's order: round-robin across users, batches, positions and ETAs. Pure: no threads, clock or I/O.

Users wait in one line. The user at the front runs their oldest job and goes to the back, so one user's
ten jobs take turns with another user's one, as a shared printer's queue does. Where a user stands is
the `line` value of their oldest queued job: a tick of the queue's own counter, taken when the user
joined the line (a job submitted with none of theirs waiting) or last had a turn. Seqs and lines are
stored with the jobs (job_store.py), so a restart rebuilds exactly the same order. A job put back
after it started (a crash, a stop, a batch-mate's cancel) waits in front, before the round-robin, and
does not change its user's place in line: a retry costs nobody a turn.

`take` hands the worker the job at the front plus queued jobs that can share its sampler batch
(batching.py decides which can). A job joins when nothing before it in the order is left behind,
or when it is its user's oldest and that user has not started a job since any job it would overtake
was submitted: one turn taken early, paid for by going to the back of the line. So no user waits
behind more than their own jobs plus one turn of each other user (tests/engine/queue/test_fairness.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

__all__ = ["Entry", "FairQueue", "StepRate"]


@dataclass(frozen=True)
class Entry:
    """One queued job as the order sees it."""

    job_id: str
    user: str
    seq: int  # when it was submitted (a tick): a user's jobs run in this order
    line: int  # where its user stands in line while this is their oldest job (a tick)
    steps: int = 0  # sampler steps, for ETAs
    key: str | None = None  # batch compatibility (batching.py); None runs alone
    front: bool = False  # put back after it started: runs before the round-robin order


class FairQueue:
    """Queued jobs in round-robin order across users."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._by_user: dict[str, list[Entry]] = {}  # each user's jobs, oldest first
        self._front: list[Entry] = []  # jobs put back after they started, by seq
        self._last_start: dict[str, int] = {}  # user -> tick of their latest start (for overtaking)
        self._tick = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, job_id: str, user: str, *, steps: int = 0, key: str | None = None) -> Entry:
        """Queue a new job; a user with nothing queued joins the back of the line."""
        tick = self.ticket()
        entry = Entry(job_id, user, seq=tick, line=tick, steps=steps, key=key)
        self._insert(entry)
        return entry

    def ticket(self) -> int:
        """The seq (and line) of a new job that is queued later with `restore`, once it is stored."""
        return self._next_tick()

    def restore(self, entry: Entry) -> None:
        """Queue a job again with its own seq and line, read back after a restart; `front` ones before the rest."""
        self._tick = max(self._tick, entry.seq, entry.line)
        self._last_start[entry.user] = self._tick  # not known after a restart: assume a recent turn
        self._insert(entry)

    def remove(self, job_id: str) -> dict[str, int]:
        """Take a queued job out (cancelled). Its user keeps their place: returns the changed lines to store."""
        entry = self._entries.pop(job_id)
        if entry.front:
            self._front.remove(entry)
            return {}
        jobs = self._by_user[entry.user]
        index = jobs.index(entry)
        del jobs[index]
        if not jobs:
            del self._by_user[entry.user]
            return {}
        if index == 0:  # their next job takes over the place in line
            return self._set_line(jobs[0], entry.line)
        return {}

    def order(self) -> list[Entry]:
        """Every queued job in the order it will run if nothing else arrives: round-robin by line."""
        users = sorted(self._by_user.values(), key=lambda jobs: (jobs[0].line, jobs[0].seq))
        depth = max((len(jobs) for jobs in users), default=0)
        # each user goes to the back after a turn, so every round visits the users in the same order
        return [*self._front, *(jobs[turn] for turn in range(depth) for jobs in users if turn < len(jobs))]

    def positions(self) -> dict[str, int]:
        """Job id -> place in the order, 1 being next."""
        return {entry.job_id: index for index, entry in enumerate(self.order(), start=1)}

    def etas(self, seconds_per_step: float | None, running_steps_left: int = 0, *, lanes: int = 1
             ) -> dict[str, float | None]:
        """Job id -> seconds until it is done: the steps ahead of it (shared by `lanes` workers) and its own, at
        the recent step rate, after `running_steps_left` of the running job that ends first."""
        order = self.order()
        if seconds_per_step is None:
            return {entry.job_id: None for entry in order}
        lanes = max(1, lanes)
        ahead, etas = 0, {}
        for entry in order:
            etas[entry.job_id] = (running_steps_left + ahead / lanes + entry.steps) * seconds_per_step
            ahead += entry.steps
        return etas

    def take(self, limit: int = 1, *, start: str | None = None) -> tuple[list[Entry], dict[str, int]]:
        """The next job (or the queued job `start`, which a worker already holding its models takes out of turn:
        engine/cluster/routing.py) and the queued jobs that can share its batch (at most `limit` in all), removed.

        A job joins when its key equals the first one's and it may overtake what is left behind (see the
        module docstring). Also returns the changed lines.
        """
        order = self.order()
        if not order:
            return [], {}
        at = 0 if start is None else next(i for i, entry in enumerate(order) if entry.job_id == start)
        head = order[at]
        batch = [head]
        if head.key is not None:
            left_behind: list[Entry] = order[:at]
            for entry in order[at + 1:]:
                if len(batch) >= limit:
                    break
                if entry.key == head.key and self._may_overtake(entry, left_behind, batch):
                    batch.append(entry)
                else:
                    left_behind.append(entry)
        changes: dict[str, int] = {}
        for entry in batch:
            self._last_start[entry.user] = self._tick
            del self._entries[entry.job_id]
            (self._front if entry.front else self._by_user[entry.user]).remove(entry)
        # a user whose turn it was goes to the back of the line (a retry in front was no turn)
        for user in dict.fromkeys(entry.user for entry in batch if not entry.front):
            jobs = self._by_user.get(user)
            if not jobs:
                self._by_user.pop(user, None)
                continue
            changes.update(self._set_line(jobs[0], self._next_tick()))  # to the back of the line
        return batch, changes

    def _may_overtake(self, entry: Entry, left_behind: list[Entry], batch: list[Entry]) -> bool:
        if not left_behind:
            return True
        if entry.front or any(e.user == entry.user for e in (*left_behind, *batch)):
            return False  # a user's jobs start in order, one turn at a time
        return self._last_start.get(entry.user, -1) < min(e.seq for e in left_behind)

    def _insert(self, entry: Entry) -> None:
        if entry.job_id in self._entries:
            raise ValueError(f"job {entry.job_id} is queued already")
        self._entries[entry.job_id] = entry
        jobs = self._front if entry.front else self._by_user.setdefault(entry.user, [])
        bisect.insort(jobs, entry, key=lambda e: e.seq)

    def _set_line(self, entry: Entry, line: int) -> dict[str, int]:
        moved = replace(entry, line=line)
        jobs = self._by_user[entry.user]
        jobs[jobs.index(entry)] = moved
        self._entries[entry.job_id] = moved
        return {entry.job_id: line}

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick


class StepRate:
    """Seconds per sampler step: an exponential moving average over recent steps."""

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self.value: float | None = None

    def observe(self, seconds: float, steps: int = 1) -> None:
        """Fold in `steps` steps that took `seconds` in all."""
        if steps <= 0 or seconds < 0:
            return
        per_step = seconds / steps
        self.value = per_step if self.value is None else self.value + self.smoothing * (per_step - self.value)
