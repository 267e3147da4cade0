"""Caching across runs (ComfyUI's input signatures), progress events and interrupts."""

from __future__ import annotations

import pytest

from engine.errors import JobCancelled, NodeExecutionError
from engine.events import (
    Event,
    Executed,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    Executing,
    ExecutionStart,
    ExecutionSuccess,
    Progress,
)
from engine.executor import Executor
from tests.engine.conftest import txt2img


def test_a_new_seed_reruns_only_the_sampler_and_what_follows(executor: Executor) -> None:
    executor.cache.clear()
    first = executor.run(txt2img(seed=100))
    assert first.meta["cached"] == []
    reroll = executor.run(txt2img(seed=101))
    assert sorted(reroll.meta["cached"]) == ["4", "5", "6", "7"]
    assert set(reroll.meta["timings"]) == {"3", "8", "9", "total"}
    # the cached encodes still report their token usage
    assert reroll.meta["tokens"]["6"]["tokens"] == first.meta["tokens"]["6"]["tokens"]


def test_node_ids_do_not_matter_to_the_cache(executor: Executor) -> None:
    executor.cache.clear()
    executor.run(txt2img(seed=5))
    renamed = {f"n{k}": {**v, "inputs": {name: ([f"n{val[0]}", val[1]] if isinstance(val, list) else val)
                                         for name, val in v["inputs"].items()}}
               for k, v in txt2img(seed=5).items()}
    again = executor.run(renamed)
    assert sorted(again.meta["cached"]) == sorted(renamed)


def test_identical_rerun_is_served_whole_from_the_cache(executor: Executor) -> None:
    executor.cache.clear()
    first = executor.run(txt2img(seed=6))
    second = executor.run(txt2img(seed=6))
    assert len(second.meta["cached"]) == len(txt2img())
    assert second.outputs == first.outputs


def test_an_output_node_whose_file_was_removed_runs_again(executor: Executor) -> None:
    """Its cached entry named the removed file (🗑️, retention, a Ray worker that sends its files to the bot): an
    identical run answered with a file that was not there, or on a worker with another job's of that name."""
    executor.cache.clear()
    first = executor.run(txt2img(seed=7))
    [image] = first.outputs["9"]["images"]
    path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    path.unlink()
    again = executor.run(txt2img(seed=7))
    assert "9" not in again.meta["cached"] and sorted(again.meta["cached"]) == ["3", "4", "5", "6", "7", "8"]
    [remade] = again.outputs["9"]["images"]
    assert (executor.settings.output_dir / remade["subfolder"] / remade["filename"]).is_file()


def test_events_follow_comfyui_order(executor: Executor) -> None:
    executor.cache.clear()
    executor.run(txt2img(seed=1))
    events: list[Event] = []
    executor.run(txt2img(seed=2), listener=events.append)
    assert isinstance(events[0], ExecutionStart)
    assert isinstance(events[1], ExecutionCached) and set(events[1].nodes) == {"4", "5", "6", "7"}
    assert [e.node for e in events if isinstance(e, Executing)] == ["3", "8", "9"]
    steps = [(e.value, e.max) for e in events if isinstance(e, Progress) and e.node == "3"]
    assert steps[-1] == (4, 4)
    executed = [e for e in events if isinstance(e, Executed)]
    assert executed[0].node == "9" and executed[0].output["images"][0]["type"] == "output"
    assert isinstance(events[-1], ExecutionSuccess)
    assert events[-1].to_dict()["type"] == "execution_success"


def test_an_interrupt_stops_at_the_next_sampler_step(executor: Executor) -> None:
    events: list[Event] = []
    steps_seen = []

    def listener(event: Event) -> None:
        events.append(event)
        if isinstance(event, Progress) and event.node == "3":
            steps_seen.append(event.value)

    with pytest.raises(JobCancelled):
        executor.run(txt2img(seed=77, steps=10), listener=listener, is_cancelled=lambda: len(steps_seen) >= 3)
    assert max(steps_seen) < 10
    assert isinstance(events[-1], ExecutionInterrupted) and events[-1].node == "3"
    # the engine carries on afterwards
    assert executor.run(txt2img(seed=78)).outputs


def test_a_failing_node_reports_an_execution_error_and_the_next_run_works(executor: Executor) -> None:
    executor.cache.clear()
    events: list[Event] = []
    executor.settings.input_dir.joinpath("garbage.png").write_bytes(b"not a png at all")
    broken = txt2img(init_image="garbage.png")
    with pytest.raises(NodeExecutionError) as caught:
        executor.run(broken, listener=events.append)
    assert caught.value.node_id == "12" and "not an image" in str(caught.value)
    error = events[-1]
    assert isinstance(error, ExecutionError) and error.node == "12" and error.class_type == "LoadImage"
    assert executor.run(txt2img(seed=3)).outputs["9"]["images"]
