"""`[engine] compile = true`: the UNet's forward through torch.compile (inductor), for plain sampling runs.

What is compiled, and why this way (measured on a full-size SD1.5 UNet, batch 2, 32x32 latents, 2 CPU cores, fp32;
eager 1.60-1.96 s a call, noisy):
- the whole UNet, static shapes, with inductor's freezing (weights folded in as constants, conv and linear weights
  prepacked for oneDNN): 1.49-1.53 s a call. Without freezing the compiled UNet was *slower* than eager here
  (1.19x whole, 1.2-1.6x block by block), and a symbolic text length made it 1.28x slower: static it is.
- each transformer block's cross-attention (attn2) runs eager, between the compiled parts: it is the only part
  whose shapes follow the prompt (77 tokens a chunk, the positive and negative repeated to a common length), so
  a new prompt, longer or shorter, never recompiles. The text context is marked dynamic and only passes through
  to those eager calls; that cost nothing measurable beside the whole graph (1.53 s against 1.49 s). A new seed
  changes no shape either.
- what does compile: the first run of each latent size and batch size (about 100 s for SD1.5 on this CPU), and a
  new checkpoint. Inductor's caches live in `[engine] compile_cache`, kept between restarts: after a restart the
  first run of a size took 60 s instead of 104 s (the trace and the weight folding are done again; the kernels
  are not). The cache keys frozen weights by their shapes, not their values, so it serves every file of an
  architecture.

Runs that hook the UNet (LoRAs through peft, FreeU and hypernetwork patches, GLIGEN boxes, SAG/PAG attention
replacements) run eager: each of those would otherwise be a new graph (minutes on a CPU) for one run.
Pixels: the compiled UNet's output differs from eager in the last float bits (about 5e-6 of a unit); results are
not bit-identical to the eager engine, which is why this is off unless the owner turns it on.

Memory: the compiled forward hangs on its UNet module (a cycle the garbage collector frees with it). Unfrozen (on a
GPU, where the graphs take the weights as inputs, inductor's default) that is all: an evicted or unloaded checkpoint
takes its compiled graphs along. Frozen (on the CPU, where freezing is measured to pay), PyTorch 2.13 keeps a graph's
weights after its module is gone, in two places: dynamo's cache entries, on the code objects every UNet of a class
shares, keep the traced graph and with it the original weights; and each graph's generated module (in sys.modules)
keeps the frozen constants, the prepacked copies and views of the weights. Neither lets go when the module dies
(measured: an engine that ran a full-size SD1.5 file compiled at 256x256 held 9.1 GB, and 7.65 GB after unloading
it; with both cleared, 1.55 GB). So `forget` clears both, for every UNet: dynamo has no way to drop one module's
entries, and the UNets still loaded compile again on their next call (from inductor's cache in `compile_cache`: a
one-step SD1.5 run at 256x256 took 53.7 s after a clear, 4.1 s before it, on this CPU). That is the trade: an
eviction costs the other loaded checkpoints a recompile instead of leaving a whole checkpoint's weights, twice over,
in memory the model budget counts as free.

Each size's frozen graph keeps its own prepacked copy of the weights (oneDNN picks the layout per shape): a full-size
SD1.5 process held 9.3, 13.7 and 18.4 GB after compiling 256, 320 and 384 pixels. So the model budget ([engine]
model_memory_bytes) counts each graph (FROZEN_GRAPH_SHARE of its UNet's weights): before a new size compiles, the
manager evicts the least recently used other models, then the older graphs (all at once, as above), and a size that
still does not fit runs eager, said in the log.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch._inductor.codecache import PyCodeCache

log = logging.getLogger(__name__)

__all__ = ["FROZEN_GRAPH_SHARE", "UnetCompiler"]

# graphs one process may keep for the UNet's forward: one per latent size x batch size x checkpoint
RECOMPILE_LIMIT = 64
# dynamo's name for that limit (cache_size_limit before torch 2.6)
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
_COMPILED = "_noodle_compiled"  # the attribute of a UNet module holding its compiled forward
# What a frozen graph of one more size keeps, for the model budget, per byte of its UNet's weights: measured on a
# full-size SD1.5 file (3.44 GB of fp32 weights), the process grew 4.1, 4.4 and 4.7 GB at 256, 320 and 384 pixels
FROZEN_GRAPH_SHARE = 1.3


class UnetCompiler:
    """Compiled forwards of UNets, one per UNet module, made on first use; `freeze`: inductor's freezing (on the
    CPU: create_executor passes the device's)."""

    def __init__(self, cache_dir: Path | None, *, freeze: bool = True, recompile_limit: int = RECOMPILE_LIMIT) -> None:
        self.cache_dir = cache_dir
        self.freeze = freeze
        # entered around every call (see _call); made once, reused: torch's patches keep their state per context
        self._config = (inductor_config.patch(freezing=freeze),
                        torch._dynamo.config.patch(**{_LIMIT: recompile_limit}))
        self._seen: set[tuple[Any, ...]] = set()
        self._frozen: dict[tuple[Any, ...], int] = {}  # frozen graphs: their copy of the weights, in bytes
        self._refused: set[tuple[Any, ...]] = set()  # sizes the model budget had no room for: run eager
        self._lock = threading.Lock()
        if cache_dir is not None:
            # read by inductor whenever it compiles: its FX graph and kernel caches (and Triton's on a GPU), kept
            # between restarts. Set even where the variable is: inductor writes its default there on first use
            cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir.resolve())

    @property
    def nbytes(self) -> int:
        """What the frozen graphs keep beyond their UNets' own weights, about a copy of the weights a size."""
        return sum(self._frozen.values())

    def forward(self, unet: torch.nn.Module, admit: Callable[[int], bool] | None = None) -> Callable[..., Any]:
        """`unet`'s compiled forward: call it as the UNet itself (latents, timestep, encoder_hidden_states=...).
        `admit(nbytes)`: asked before a frozen graph of a new size compiles, whether its copy of the weights may be
        kept (the manager makes room in its model budget); refused, that call runs eager."""
        with self._lock:
            compiled = unet.__dict__.get(_COMPILED)
            if compiled is None:
                _keep_cross_attention_eager(unet)
                # freezing: the graph's weights are constants, so it must never see a UNet whose weights change in
                # place; LoRA runs (peft layers beside the weights) stay eager, and a reloaded file is a new module
                compiled = torch.compile(unet, dynamic=False)
                # on the module itself, not in a registry keyed by it: the compiled module holds the UNet, so a
                # registry (a WeakKeyDictionary too) would keep every unloaded UNet alive. object.__setattr__: not
                # a submodule (nn.Module's own setattr would register it, and state_dict would hold it twice)
                object.__setattr__(unet, _COMPILED, compiled)
        return lambda x, t, **kwargs: self._call(unet, compiled, admit, x, t, **kwargs)

    def forget(self, unet: torch.nn.Module) -> None:
        """The manager lets go of `unet` (unloaded or evicted): frozen, what the compiled graphs keep of its weights
        is let go too, with every other UNet's graphs (see the module's docstring)."""
        if unet.__dict__.pop(_COMPILED, None) is not None and self.freeze:
            self.clear()

    def clear(self) -> None:
        """Every compiled graph of every UNet (frozen, the only way to free what they keep); each compiles again on
        its next call."""
        with self._lock:
            if not self._seen:
                return
            _drop_frozen_graphs()
            self._seen.clear()  # the sizes compile again: their first run says so
            self._frozen.clear()
            self._refused.clear()
        log.info("freed the compiled UNet graphs; the loaded checkpoints' UNets compile again on their next run "
                 "(from inductor's cache in %s)", self.cache_dir or "inductor's default folder")

    def _call(self, unet: torch.nn.Module, compiled: Callable[..., Any], admit: Callable[[int], bool] | None,
              x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> Any:
        context = kwargs.get("encoder_hidden_states")
        if context is not None:
            # its length follows the prompt; it only reaches the eager cross-attention, so no kernel depends on it
            torch._dynamo.maybe_mark_dynamic(context, 1)
        key = (id(unet), tuple(x.shape), x.dtype, x.device.type)
        if key not in self._seen:
            if self.freeze:
                copy = _graph_bytes(unet)
                if admit is not None and not admit(copy):  # asked again each call (room may free up), said once
                    if key not in self._refused:
                        self._refused.add(key)
                        log.warning("latents of %s run eager: their compiled graph would keep another %.1f GB copy "
                                    "of the UNet's weights, over [engine] model_memory_bytes with what else is loaded",
                                    "x".join(map(str, x.shape)), copy / 1e9)
                    return unet(x, t, **kwargs)
                self._frozen[key] = copy
                self._refused.discard(key)
            self._seen.add(key)
            log.info("compiling the UNet for latents of %s (first run of this size; a minute or more on a CPU, "
                     "cached in %s)", "x".join(map(str, x.shape)), self.cache_dir or "inductor's default folder")
        # both are read when a graph compiles, inside this call, and torch keeps its config per context
        # (contextvars), so they are set in the calling thread's: a limit set where the executor was made did not
        # reach the engine's own thread, which compiled 8 sizes at most and ran the rest eager (measured). Freezing
        # is not handed to torch.compile in `options`: it did not take there (2.45 s a call, the unfrozen graph's
        # time, against 1.49 s)
        freezing, limit = self._config
        with freezing, limit:
            return compiled(x, t, **kwargs)


def _graph_bytes(unet: torch.nn.Module) -> int:
    return int(FROZEN_GRAPH_SHARE * sum(p.numel() * p.element_size() for p in unet.parameters()))


def _drop_frozen_graphs() -> None:
    """Every compiled graph, and the generated modules that hold their frozen weights. By hand: torch's reset clears
    dynamo's cache entries but leaves the generated modules loaded, holding the constants (torch 2.13)."""
    torch._dynamo.reset()
    for module in PyCodeCache.modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    PyCodeCache.cache_clear()  # the modules in memory; the files on disk (the cache) stay


def _keep_cross_attention_eager(unet: torch.nn.Module) -> None:
    """Every transformer block's cross-attention runs outside the compiled graph (see the module's docstring)."""
    for module in unet.modules():
        attn2 = getattr(module, "attn2", None)
        if isinstance(attn2, torch.nn.Module) and not getattr(attn2, "_noodle_eager", False):
            attn2.forward = torch.compiler.disable(attn2.forward)  # type: ignore[method-assign]
            attn2._noodle_eager = True
