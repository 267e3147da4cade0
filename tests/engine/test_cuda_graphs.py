"""[engine] cuda_graphs: the UNet's call replayed as a graph, with the pixels of the eager engine.

On the CPU no CUDA graph can be captured, so the capture is a stand-in that "replays" by running the captured call
again on the graph's own input tensors and writing into its own output tensor, as a CUDA graph's replay reads and
writes fixed memory: a call whose inputs were not copied in computes on the last call's, and an output handed back
without a copy is overwritten by the next replay. Under NOODLE_TEST_DEVICE=cuda the same tests capture real graphs.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.executor import Executor
from engine.models.cuda_graphs import Capture, UnetGraphs, capture_on_cuda
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img


def stand_in(run: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any, Any]:
    """A capture on the CPU: each replay calls again, into the graph's own output tensor. Its pool: the one it was
    given, or a new token."""
    output = run()
    return (lambda: output.copy_(run())), output, pool if pool is not None else object()


class Counted:
    """A capture (the stand-in, or the real one on CUDA) that counts its captures and the pools it was given."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.captures = 0
        self.pools: list[Any] = []  # the pool each capture was handed (None: a new one)

    def __call__(self, run: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any, Any]:
        self.captures += 1
        self.pools.append(pool)
        return self.capture(run, pool)


@pytest.fixture(scope="module")
def graphed(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    executor = tiny_executor(tiny_models, tmp_path_factory.mktemp("graphed"))
    on_cuda = executor.models.device.type == "cuda"  # NOODLE_TEST_DEVICE=cuda: real graphs
    executor.models.graphs = UnetGraphs(capture=Counted(capture_on_cuda if on_cuda else stand_in))
    return executor


def _picture(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    image = executor.run(workflow).to_dict()["outputs"]["9"]["images"][0]
    path = executor.settings.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def _captures(executor: Executor) -> int:
    graphs = executor.models.graphs
    assert graphs is not None and isinstance(graphs.capture, Counted)
    return graphs.capture.captures


def test_a_graphed_run_draws_the_eager_picture_and_a_new_seed_replays(graphed: Executor, executor: Executor) -> None:
    before = _captures(graphed)
    assert np.array_equal(_picture(graphed, txt2img(seed=7)), _picture(executor, txt2img(seed=7)))
    assert _captures(graphed) == before + 1  # cond and uncond in one call: one signature, captured once
    # a new seed and another prompt of the same length replay the graph, and still draw their own pictures
    workflow = txt2img(seed=8, prompt="a blue heron by the river")
    assert np.array_equal(_picture(graphed, workflow), _picture(executor, workflow))
    assert _captures(graphed) == before + 1
    other_size = txt2img(seed=8, width=96)
    assert np.array_equal(_picture(graphed, other_size), _picture(executor, other_size))
    assert _captures(graphed) == before + 2


def test_a_lora_run_stays_eager(graphed: Executor, executor: Executor) -> None:
    workflow = txt2img(seed=9, loras=[("tiny-lora-a.safetensors", 0.8, 0.8)])
    before = _captures(graphed)
    assert np.array_equal(_picture(graphed, workflow), _picture(executor, workflow))
    assert _captures(graphed) == before


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        extra = kwargs.get("added_cond_kwargs", {}).get("text_embeds", 0.0)
        return type("Out", (), {"sample": x * self.weight + t.reshape(-1, 1) + extra})()


def test_each_call_sees_its_own_inputs_and_keeps_its_output() -> None:
    capture = Counted(stand_in)
    graphs = UnetGraphs(capture=capture)
    module = _Scale()
    forward = graphs.forward(module)
    assert forward is not None
    with torch.inference_mode():
        first = forward(torch.ones(2, 3), torch.zeros(2), added_cond_kwargs={"text_embeds": torch.ones(2, 3)}).sample
        second = forward(torch.full((2, 3), 5.0), torch.ones(2),
                         added_cond_kwargs={"text_embeds": torch.zeros(2, 3)}).sample
    assert capture.captures == 1
    assert torch.equal(second, torch.full((2, 3), 11.0))  # this call's inputs, not the captured ones
    assert torch.equal(first, torch.full((2, 3), 3.0))  # not overwritten by the second replay


def test_moved_weights_are_captured_again_and_old_graphs_give_way() -> None:
    capture = Counted(stand_in)
    graphs = UnetGraphs(capture=capture, limit=2)
    module = _Scale()
    with torch.inference_mode():
        graphs.forward(module)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]
        module.weight = torch.nn.Parameter(torch.full((1,), 3.0))  # new memory: the graph's reads are stale
        out = graphs.forward(module)(torch.ones(1, 3), torch.zeros(1)).sample  # type: ignore[misc]
        assert capture.captures == 2 and torch.equal(out, torch.full((1, 3), 3.0))
        for width in (4, 5, 6):
            graphs.forward(module)(torch.ones(1, width), torch.zeros(1))  # type: ignore[misc]
    assert len(module.__dict__["_noodle_cuda_graphs"].graphs) == 2  # the limit: the oldest dropped


def test_a_failed_capture_runs_eager_from_then_on(caplog: pytest.LogCaptureFixture) -> None:
    def failing(run: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any, Any]:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphs = UnetGraphs(capture=failing)
    module = _Scale()
    with caplog.at_level(logging.WARNING, logger="engine.models.cuda_graphs"), torch.inference_mode():
        out = graphs.forward(module)(torch.ones(1, 3), torch.zeros(1)).sample  # type: ignore[misc]
    assert torch.equal(out, torch.full((1, 3), 2.0))
    assert "runs eager from now on" in caplog.text
    assert graphs.forward(module) is None


def test_no_graphs_off_cuda() -> None:
    assert UnetGraphs().forward(_Scale()) is None  # a UNet on the CPU


def test_an_unloaded_unets_graphs_go_with_it_and_leave_room() -> None:
    graphs = UnetGraphs(capture=Counted(stand_in), limit=2)
    gone, kept = _Scale(), _Scale()
    with torch.inference_mode():
        graphs.forward(kept)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]
        graphs.forward(gone)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]  # newer than kept's
        module = weakref.ref(gone)
        del gone
        gc.collect()
        assert module() is None  # its graph held no reference to it
        graphs.forward(kept)(torch.ones(1, 4), torch.zeros(1))  # type: ignore[misc]
    assert len(kept.__dict__["_noodle_cuda_graphs"].graphs) == 2  # the dead UNet's place was given back


def test_every_graph_is_captured_into_the_first_ones_pool_until_none_is_left() -> None:
    # one pool for all: the graphs keep about the largest call's activations, not one call's per size captured
    capture = Counted(stand_in)
    graphs = UnetGraphs(capture=capture)
    first, second = _Scale(), _Scale()
    with torch.inference_mode():
        graphs.forward(first)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]
        graphs.forward(first)(torch.ones(1, 4), torch.zeros(1))  # type: ignore[misc]  # another size
        graphs.forward(second)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]  # another UNet
        shared = capture.pools[1]
        assert capture.pools[0] is None and shared is not None and capture.pools[2] is shared
        graphs.clear()  # the out-of-memory path: every graph, and so the pool, let go
        graphs.forward(first)(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]
        assert capture.pools[3] is None
        del first, second
        gc.collect()  # the UNets unloaded: their graphs, and the pool, went with them
        graphs.forward(_Scale())(torch.ones(1, 3), torch.zeros(1))  # type: ignore[misc]
        assert capture.pools[4] is None


def test_graphs_whose_outputs_share_memory_replay_in_any_order() -> None:
    # in a shared pool a later graph's output may sit in an earlier graph's temporaries: this stand-in puts every
    # graph's output at the start of one buffer, so each replay overwrites the others' outputs
    buffer = torch.zeros(64)

    def shared(run: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any, Any]:
        first = run()
        output = buffer[:first.numel()].view(first.shape)
        output.copy_(first)
        return (lambda: output.copy_(run())), output, pool if pool is not None else object()

    graphs = UnetGraphs(capture=shared)
    module = _Scale()
    forward = graphs.forward(module)
    assert forward is not None
    with torch.inference_mode():
        got = [forward(torch.full((1, width), float(width)), torch.zeros(1)).sample for width in (3, 4, 3, 4, 3)]
    for out, width in zip(got, (3, 4, 3, 4, 3)):
        assert torch.equal(out, torch.full((1, width), 2.0 * width))
