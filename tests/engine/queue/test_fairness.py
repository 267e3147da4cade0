"""The fair order: round-robin across users, batches that skip nobody's turn, positions, ETAs, restarts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.queue.fairness import Entry, FairQueue, StepRate

USERS = st.sampled_from(["ann", "bob", "cat", "dan"])
KEYS = st.sampled_from([None, "a", "b"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), USERS, KEYS),
        st.tuples(st.just("take"), st.integers(1, 4), st.just(None)),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.just(None)),
    ),
    max_size=60,
)


@dataclass
class Trace:
    """What a sequence of operations did: when each job was pushed and which batch ran it."""

    queue: FairQueue = field(default_factory=FairQueue)
    user: dict[str, str] = field(default_factory=dict)
    ahead_at_push: dict[str, int] = field(default_factory=dict)  # the user's own jobs queued before it
    pushed_at: dict[str, int] = field(default_factory=dict)  # the number of batches taken before
    batches: list[list[Entry]] = field(default_factory=list)

    def apply(self, ops: list[tuple]) -> Trace:
        for op, arg, key in ops:
            if op == "push":
                job_id = f"j{len(self.user)}"
                self.ahead_at_push[job_id] = sum(1 for e in self.queue.order() if e.user == arg)
                self.pushed_at[job_id] = len(self.batches)
                self.user[job_id] = arg
                self.queue.push(job_id, arg, steps=4, key=key)
            elif op == "take":
                batch, _ = self.queue.take(arg)
                if batch:
                    self.batches.append(batch)
            elif len(self.queue):
                self.queue.remove(self.queue.order()[arg % len(self.queue)].job_id)
        return self


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_no_user_waits_behind_more_than_their_own_jobs_plus_one_turn_of_each_other_user(ops: list[tuple]) -> None:
    trace = Trace().apply(ops)
    for index, batch in enumerate(trace.batches):
        for job in batch:
            before = [e for b in trace.batches[trace.pushed_at[job.job_id]:index] for e in b]
            for other in {e.user for e in before} - {job.user}:
                turns = sum(1 for e in before if e.user == other)
                assert turns <= trace.ahead_at_push[job.job_id] + 1, (job, other, turns)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_each_users_jobs_start_in_the_order_they_were_submitted(ops: list[tuple]) -> None:
    trace = Trace().apply(ops)
    started = [e for batch in trace.batches for e in batch]
    for user in set(trace.user.values()):
        seqs = [e.seq for e in started if e.user == user]
        assert seqs == sorted(seqs)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_positions_are_the_order_jobs_then_start_in(ops: list[tuple]) -> None:
    queue = Trace().apply(ops).queue
    expected = sorted(queue.positions(), key=queue.positions().get)
    started = []
    while len(queue):
        batch, _ = queue.take(1)
        started.extend(e.job_id for e in batch)
    assert started == expected


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_a_queue_rebuilt_from_stored_seqs_and_lines_has_the_same_order(ops: list[tuple]) -> None:
    queue = Trace().apply(ops).queue
    rebuilt = FairQueue()
    for entry in sorted(queue.order(), key=lambda e: e.job_id):  # rows come back in any order
        rebuilt.restore(entry)
    assert [e.job_id for e in rebuilt.order()] == [e.job_id for e in queue.order()]
    # and new jobs after the restart line up behind the old ones
    assert rebuilt.push("new", "eve").seq > max((e.seq for e in queue.order()), default=0)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(0, 50))
def test_cancelling_a_job_moves_nobody_back(ops: list[tuple], pick: int) -> None:
    queue = Trace().apply(ops).queue
    if not len(queue):
        return
    before = queue.positions()
    gone = queue.order()[pick % len(queue)].job_id
    queue.remove(gone)
    after = queue.positions()
    assert set(after) == set(before) - {gone}
    assert all(after[job] <= before[job] for job in after)


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 4))
def test_jobs_put_back_run_first_and_cost_nobody_their_place(ops: list[tuple], limit: int) -> None:
    queue = Trace().apply(ops).queue
    batch, _ = queue.take(limit)
    rest = [e.job_id for e in queue.order()]
    for entry in reversed(batch):  # a batch cut short by a stop or a crash comes back, in any order
        queue.restore(replace(entry, front=True))
    first = sorted(batch, key=lambda e: e.seq)  # in front, oldest first
    assert [e.job_id for e in queue.order()] == [e.job_id for e in first] + rest
    if batch:
        again, _ = queue.take(1)
        assert again == [replace(first[0], front=True)]
        assert [e.job_id for e in queue.order()][len(batch) - 1:] == rest


def test_ten_jobs_of_one_user_do_not_starve_anothers_one() -> None:
    queue = FairQueue()
    for n in range(10):
        queue.push(f"a{n}", "ann")
    queue.push("b0", "bob")
    assert queue.positions()["b0"] == 2
    assert [queue.take()[0][0].job_id for _ in range(3)] == ["a0", "b0", "a1"]


def test_a_user_who_just_had_a_turn_waits_for_the_others() -> None:
    queue = FairQueue()
    queue.push("a0", "ann")
    queue.push("b0", "bob")
    queue.push("b1", "bob")
    assert queue.take()[0][0].job_id == "a0"  # ann runs and goes to the back of the line
    queue.push("a1", "ann")
    assert [e.job_id for e in queue.order()] == ["b0", "a1", "b1"]


def test_a_batch_takes_other_users_turns_but_never_skips_a_waiting_job() -> None:
    queue = FairQueue()
    queue.push("a0", "ann", key="k")
    queue.push("a1", "ann", key="k")
    queue.push("b0", "bob", key="other")
    queue.push("c0", "cat", key="k")
    # order: a0 b0 c0 a1; c0 is cat's turn of this round; a1 would jump bob's job
    assert [e.job_id for e in queue.order()] == ["a0", "b0", "c0", "a1"]
    batch, _ = queue.take(4)
    assert [e.job_id for e in batch] == ["a0", "c0"]
    assert [e.job_id for e in queue.order()] == ["b0", "a1"]


def test_jobs_without_a_key_run_alone_and_one_users_run_batches_when_nobody_waits() -> None:
    queue = FairQueue()
    queue.push("x", "ann")
    queue.push("y", "ann")
    assert [e.job_id for e in queue.take(4)[0]] == ["x"]
    for n in range(5):
        queue.push(f"k{n}", "bob", key="k")
    queue.remove("y")
    assert [e.job_id for e in queue.take(4)[0]] == ["k0", "k1", "k2", "k3"]


def test_etas_add_up_the_steps_ahead() -> None:
    queue = FairQueue()
    queue.push("a", "ann", steps=10)
    queue.push("b", "bob", steps=20)
    assert queue.etas(None) == {"a": None, "b": None}
    assert queue.etas(0.5, running_steps_left=4) == {"a": 7.0, "b": 17.0}


def test_step_rate_is_a_moving_average() -> None:
    rate = StepRate(smoothing=0.5)
    assert rate.value is None
    rate.observe(2.0, steps=2)
    rate.observe(3.0)
    assert rate.value == pytest.approx(2.0)
    rate.observe(1.0, steps=0)  # no steps: nothing learned
    assert rate.value == pytest.approx(2.0)
