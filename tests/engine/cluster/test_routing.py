"""Routing without Ray: which free worker starts which queued job, why, and how long a job may be passed over."""

from __future__ import annotations

import random

from engine.cluster.routing import Candidate, Holdings, Needs, Router, needs_of
from engine.nodes import catalog
from engine.templates import LoraChoice, WorkflowParams, build_workflow

MIB = 2**20


def worker(name: str, *held: str, free: bool = True, idle_since: float = 0.0, room: int = 0,
           texts: tuple[tuple[str, str], ...] = (), loras: tuple[str, ...] = ()) -> Candidate:
    return Candidate(name, Holdings(held, frozenset(loras), frozenset(texts), room), free, idle_since)


def job(job_id: str, checkpoint: str, *texts: str, loras: tuple[str, ...] = ()) -> tuple[str, Needs]:
    return job_id, Needs((checkpoint,), loras, texts, 12 * MIB)


def test_a_job_goes_to_the_free_worker_holding_its_checkpoint() -> None:
    picks = Router().assign([job("j1", "b")], [worker("w1", "a"), worker("w2", "b")])
    assert [(p.worker, p.job_id) for p in picks] == [("w2", "j1")]
    assert picks[0].reason == "holds b"


def test_loras_then_text_encodings_then_idle_time_break_ties() -> None:
    holders = [worker("w1", "a", idle_since=1), worker("w2", "a", idle_since=5, loras=("x",)),
               worker("w3", "a", idle_since=9, loras=("x",), texts=(("a", "a fox"),))]
    [pick] = Router().assign([job("j1", "a", "a fox", loras=("x",))], holders)
    assert pick.worker == "w3"
    assert pick.reason == "holds a, 1 of its 1 LoRAs, 1 of its 1 text encodings"
    [pick] = Router().assign([job("j1", "a")], holders)
    assert pick.worker == "w1"  # nothing else to choose by: the one idle longest


def test_a_job_nobody_holds_goes_where_it_loads_cheapest() -> None:
    roomy = [worker("w1", "a", idle_since=1), worker("w2", "b", idle_since=2, room=64 * MIB)]
    [pick] = Router().assign([job("j1", "c")], roomy)
    assert (pick.worker, pick.reason) == ("w2", "no free worker holds c; it has room for it (64 MiB free)")
    full = [worker("w1", "a", idle_since=3), worker("w2", "b", idle_since=2)]
    [pick] = Router().assign([job("j1", "c")], full)
    assert (pick.worker, pick.reason) == ("w2", "no free worker holds c; idle longest, evicting b")


def test_a_job_whose_holder_is_busy_waits_while_a_later_job_uses_the_free_worker() -> None:
    router = Router(patience=2)
    workers = [worker("w1", "a", free=False), worker("w2", "b")]
    queue = [job("j1", "a"), job("j2", "b")]
    assert [(p.worker, p.job_id) for p in router.assign(queue, workers)] == [("w2", "j2")]
    assert router.passed_over == {"j1": 1}
    # with nothing else to do, the free worker takes it after all: a load beats an idle device
    [pick] = router.assign([job("j1", "a")], workers)
    assert (pick.worker, pick.job_id) == ("w2", "j1")
    assert pick.reason.startswith("its holder is busy; ") and pick.reason.endswith("(passed over 1 times)")


def test_patience_bounds_how_often_a_job_is_passed_over() -> None:
    router = Router(patience=3)
    workers = [worker("w1", "a", free=False), worker("w2", "b")]
    for n in range(3):  # "old" needs c, which nobody holds: jobs w2 holds the checkpoint of go first
        [pick] = router.assign([job("old", "c"), job(f"new{n}", "b")], workers)
        assert pick.job_id == f"new{n}"
    [pick] = router.assign([job("old", "c"), job("new3", "b")], workers)
    assert (pick.job_id, pick.worker) == ("old", "w2")
    assert pick.reason.startswith("out of patience; no free worker holds c")
    assert pick.reason.endswith("(passed over 3 times)")
    assert "old" not in router.passed_over  # it started: forgotten


def test_out_of_patience_a_job_a_busy_worker_holds_is_that_workers_next() -> None:
    router = Router(patience=1)
    busy = [worker("w1", "a", free=False), worker("w2", "b")]
    [pick] = router.assign([job("old", "a"), job("new", "b")], busy)
    assert pick.job_id == "new"
    [pick] = router.assign([job("old", "a"), job("newer", "b")], busy)
    assert pick.job_id == "newer"  # no load of a on w2: w1 holds it and finishes its job first
    [pick, _] = router.assign([job("old", "a"), job("later", "a")], [worker("w1", "a"), worker("w2", "b")])
    assert (pick.job_id, pick.worker) == ("old", "w1")
    assert pick.reason.startswith("out of patience; holds a")


def test_patience_zero_keeps_the_fair_order_and_only_chooses_the_worker() -> None:
    picks = Router(patience=0).assign([job("j1", "a"), job("j2", "b")], [worker("w1", "b"), worker("w2", "a")])
    assert [(p.job_id, p.worker) for p in picks] == [("j1", "w2"), ("j2", "w1")]
    [pick] = Router(patience=0).assign([job("j1", "a"), job("j2", "b")], [worker("w1", "b")])
    assert pick.job_id == "j1"  # the head job, though w1 holds the second one's checkpoint


def test_a_job_avoids_the_worker_that_died_running_it_while_another_can_take_it() -> None:
    workers = [worker("w1", "a"), worker("w2", "b")]
    [pick] = Router().assign([job("j1", "a")], workers, avoid={"j1": ["w1"]})
    assert pick.worker == "w2"
    [pick] = Router().assign([job("j1", "a")], workers[:1], avoid={"j1": ["w1"]})
    assert pick.worker == "w1"  # the only one left


def test_round_robin_ignores_what_workers_hold() -> None:
    router = Router("round_robin")
    workers = [worker("w1", "b"), worker("w2", "a")]
    picks = router.assign([job("j1", "a"), job("j2", "b")], workers)
    assert [(p.job_id, p.worker) for p in picks] == [("j1", "w1"), ("j2", "w2")]


def simulate(router: Router, stream: list[str], workers: int = 2) -> tuple[int, int]:
    """Jobs of equal length over `workers` that hold one checkpoint each: (loads, most times a job was passed
    over)."""
    queue = [job(f"j{n}", checkpoint) for n, checkpoint in enumerate(stream)]
    held = {f"w{n}": () for n in range(workers)}
    busy_until = dict.fromkeys(held, 0)
    now = loads = most = 0
    while queue:
        candidates = [worker(name, *held[name], free=busy_until[name] <= now, idle_since=busy_until[name])
                      for name in held]
        picks = router.assign(queue, candidates) if any(c.free for c in candidates) else []
        most = max([most, *router.passed_over.values()])
        for pick in picks:
            needs = dict(queue)[pick.job_id]
            if needs.checkpoints != held[pick.worker]:
                loads, held[pick.worker] = loads + 1, needs.checkpoints
            busy_until[pick.worker] = now + 1
            queue = [entry for entry in queue if entry[0] != pick.job_id]
        now = min(t for t in busy_until.values() if t > now) if not picks else now
    return loads, most


def test_routing_loads_a_third_of_round_robin_on_a_mixed_backlog() -> None:
    for seed in (1, 2, 17):
        pick = random.Random(seed)
        stream = [pick.choice("abc") for _ in range(36)]
        turns, _ = simulate(Router("round_robin"), stream)
        routed, most = simulate(Router(patience=8), stream)
        assert routed * 3 <= turns, (seed, routed, turns)
        assert most <= 8


def test_needs_are_read_from_the_graph() -> None:
    workflow = build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a fox", negative="blurry",
                                             loras=(LoraChoice("tiny-lora-a.safetensors", 0.8),)))
    needs = needs_of(workflow, catalog(), lambda name: 7)
    assert needs == Needs(("tiny-sd15.safetensors",), ("tiny-lora-a.safetensors",), ("a fox", "blurry"), 7)
    assert needs_of({"1": "not a node", "2": {"class_type": "Nope"}}, catalog()) == Needs()
