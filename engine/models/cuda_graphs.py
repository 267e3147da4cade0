"""`[engine] cuda_graphs = true`: on a CUDA device, plain sampling runs replay the UNet's call as a CUDA graph.

Why: a UNet call is a long chain of small kernels (an SD1.5 UNet call is 1,215 tensor operations, counted on the
CPU with a dispatch mode), each launched from Python. On a fast card at 512x512 the GPU can finish them quicker
than Python issues them, so the card waits on the host. A graph captures one call's kernels once and replays them
with one launch. The kernels are the same ones, on the same inputs, so a replay is expected to give eager's
numbers; that and the time it saves have not been measured yet (no GPU was lent while this was written):
`noodle bench gpu` measures both, in its lever stage. torch.compile's "reduce-overhead" mode does the same behind
inductor; this needs no compile and also wraps `[engine] compile`'s forward.

What is captured: one graph per UNet module and per call signature (the shape, dtype and device of every tensor
argument; the other arguments' values), on that signature's first call: two warm-up calls on a side stream, the
capture, then a replay. Every call copies its inputs into the graph's own tensors, replays, and hands back a copy
of the output (the next replay overwrites the graph's). A new seed or prompt of the same length replays; a prompt
of another length (77 tokens a chunk) or another image size is a new capture, which costs about three calls.

Where not: off CUDA (no graphs there), and where `[engine] compile` would stay eager too (LoRAs, UNet patches, CFG
hooks, GLIGEN boxes: the manager's unet_forward decides). A capture that fails leaves that UNet eager for the
rest of the process, said once in the log.

Memory: the graphs share one memory pool (the first capture's, handed to every later one), so what they keep is
about the largest call's activations, not the sum over every size captured. That is safe here because a graph's
temporaries are dead once its replay ends and replays never overlap (one lock, one stream), and because each
replay's output is copied out before the lock is let go: a later graph may have been given an earlier one's
temporaries for its output, so the earlier graph's next replay overwrites it (PyTorch's notes ask for replays in
capture order for that reason; the copy makes the order free). At most MAX_GRAPHS graphs are kept in the
process, the least recently used dropped first, and a UNet's graphs go with its module (they hang on it, as the
compiled forward does). The pool goes back to torch's cache when the last graph does (unload_all, the
out-of-memory path, drops them all). A graph reads the weights where they were at capture: once per run the
UNet's weight addresses are checked, and its graphs are dropped if any moved.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

__all__ = ["Capture", "GraphOutput", "UnetGraphs", "capture_on_cuda"]

MAX_GRAPHS = 8  # sizes kept at once: the pool is shared, but each graph keeps its inputs, output and kernels
WARMUPS = 2  # eager calls before a capture: cuBLAS and cuDNN pick and allocate their workspaces there
_GRAPHS = "_noodle_cuda_graphs"  # the attribute of a UNet module holding its graphs

# (the call to capture, the pool to capture into or None for a new one) -> (replay, the output the replays write,
# the pool the graph's memory is in)
Capture = Callable[[Callable[[], Any], Any], tuple[Callable[[], None], Any, Any]]


def capture_on_cuda(run: Callable[[], Any], pool: Any = None) -> tuple[Callable[[], None], Any, Any]:
    """`run` captured as a CUDA graph in `pool` (a graph's pool(), or None): (replay, the output tensors the
    replays write, the graph's pool), after warm-ups on a side stream as PyTorch's CUDA graphs notes ask."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUPS):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA work of the engine's other threads (a VAE decode, a text encode) does not void the capture
    # no explicit stream: every capture runs on torch.cuda.graph's one default capture stream, which sharing a pool
    # asks for
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = run()
    return graph.replay, output, graph.pool()


@dataclass(frozen=True)
class GraphOutput:
    """What a graphed UNet call hands back: the prediction, as the UNet's output carries it."""

    sample: torch.Tensor


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: list[torch.Tensor]  # the graph's own input tensors, in the flattened arguments' order
    output: torch.Tensor


@dataclass
class _UnetState:
    """One UNet module's graphs, hung on the module."""

    weights: tuple[int, ...]  # the addresses its graphs read the weights at
    graphs: dict[tuple[Any, ...], _Graph] = field(default_factory=dict)
    off: bool = False  # a capture failed: eager from then on


class UnetGraphs:
    """The UNet's call replayed as CUDA graphs for plain sampling runs; `capture` is how a call is captured
    (capture_on_cuda; a test hands a CPU stand-in that replays by calling again)."""

    def __init__(self, capture: Capture = capture_on_cuda, limit: int = MAX_GRAPHS) -> None:
        self.capture = capture
        self.limit = limit
        # every kept graph, least recently used first: (its UNet, weakly, and its key) for dropping the oldest
        self._order: OrderedDict[tuple[int, tuple[Any, ...]], weakref.ref[torch.nn.Module]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: Any = None  # the pool every graph is captured into, from the first capture on
        # one graph call at a time, across UNets: graphs sharing a pool must never run at once
        self._running = threading.Lock()

    def forward(self, unet: torch.nn.Module, call: Callable[..., Any] | None = None) -> Callable[..., Any] | None:
        """The graphed form of `call` (the UNet itself, or its compiled forward) for one sampling run, or None
        where graphs do not apply: a UNet off CUDA (with the CUDA capture), or after a failed capture."""
        if next(unet.parameters()).device.type != "cuda" and self.capture is capture_on_cuda:
            return None
        state = self._state(unet)
        if state.off:
            return None
        run = call or unet
        return lambda *args, **kwargs: self._call(unet, state, run, args, kwargs)

    def clear(self) -> None:
        """Drop every graph (their pools go back to torch's cache)."""
        with self._lock:
            for (_, key), ref in self._order.items():
                _drop(ref, key)
            self._order.clear()
            self._pool = None

    def _state(self, unet: torch.nn.Module) -> _UnetState:
        weights = tuple(t.data_ptr() for t in itertools.chain(unet.parameters(), unet.buffers()))
        state: _UnetState | None = unet.__dict__.get(_GRAPHS)
        if state is None:
            state = _UnetState(weights)
            object.__setattr__(unet, _GRAPHS, state)  # not a submodule; goes with the module
        elif state.weights != weights:
            log.info("the UNet's weights moved since its CUDA graphs were captured: captured again on next use")
            with self._lock:
                for key in state.graphs:
                    self._order.pop((id(unet), key), None)
            state.graphs.clear()
            state.weights = weights
        return state

    def _call(self, unet: torch.nn.Module, state: _UnetState, run: Callable[..., Any], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key is None or state.off:
            return run(*args, **kwargs)
        with self._running:
            graph = state.graphs.get(key)
            if graph is None:
                graph = self._captured(unet, state, run, leaves, spec, key)
                if graph is None:
                    return run(*args, **kwargs)
            else:
                for mine, given in zip(graph.inputs, (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))):
                    mine.copy_(given)
            self._used(unet, key)
            graph.replay()
            return GraphOutput(graph.output.clone())

    def _captured(self, unet: torch.nn.Module, state: _UnetState, run: Callable[..., Any], leaves: list[Any],
                  spec: pytree.TreeSpec, key: tuple[Any, ...]) -> _Graph | None:
        """A new graph for this signature, its inputs holding this call's values; None if the capture failed."""
        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        with self._lock:
            if not any(ref() is not None for ref in self._order.values()):
                self._pool = None  # every graph went with its UNet, and their pool with them: a new one
        try:
            replay, output, self._pool = self.capture(lambda: _sample(run(*args, **kwargs)), self._pool)
        except Exception as err:  # an op that cannot be captured: this UNet stays eager
            state.off = True
            log.warning("CUDA graph capture of the UNet failed (%s: %s); it runs eager from now on",
                        type(err).__name__, err)
            return None
        graph = _Graph(replay, [t for t in inputs if isinstance(t, torch.Tensor)], output)
        state.graphs[key] = graph
        log.info("captured the UNet's call for latents of %s as a CUDA graph",
                 "x".join(map(str, inputs[0].shape)) if inputs and isinstance(inputs[0], torch.Tensor) else "?")
        return graph

    def _used(self, unet: torch.nn.Module, key: tuple[Any, ...]) -> None:
        with self._lock:
            entry = (id(unet), key)
            self._order[entry] = weakref.ref(unet)
            self._order.move_to_end(entry)
            for gone in [e for e, ref in self._order.items() if ref() is None]:
                del self._order[gone]  # an unloaded UNet's graphs went with it: they hold no place
            while len(self._order) > self.limit:
                (_, old_key), ref = self._order.popitem(last=False)
                _drop(ref, old_key)


def _drop(ref: weakref.ref[torch.nn.Module], key: tuple[Any, ...]) -> None:
    """The graph kept for `key` on the UNet `ref` points to, let go (nothing if that UNet is gone)."""
    unet = ref()
    state = None if unet is None else unet.__dict__.get(_GRAPHS)
    if state is not None:
        state.graphs.pop(key, None)


def _sample(output: Any) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output


def _signature(leaves: list[Any], spec: pytree.TreeSpec) -> tuple[Any, ...] | None:
    """What a graph is kept for: the arguments' structure, each tensor's shape, dtype and device, the other
    values themselves; None where one of those cannot key a graph (an unhashable value)."""
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            parts.append(("value", leaf))
    return tuple(parts)
