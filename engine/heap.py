"""CPU memory reuse between sampler steps: glibc's malloc, tuned at run time.

PyTorch's CPU allocator has no cache of its own (CUDA has its caching allocator): every activation of every UNet
call is a fresh `malloc`, and glibc hands a large one to the kernel (`mmap`, then `munmap` on free) or trims the
heap top after it. Each step then page-faults the same few hundred megabytes back in, and the kernel zeroes
every page. On this 2-core machine (full-size SD1.5 UNet, batch 2, on a worker thread) a call at 256x256 takes
2.9-3.4 s without the reuse and 2.2-2.4 s with it, at 512x512 10.2-11.5 s and 9.2-9.6 s, and the VAE decode at
512x512 16.7-20.7 s and 13.0-17.7 s; the peak memory grows from 5.4 GB to 6.1-6.8 GB. The arithmetic is the
same: the pictures do not change by a bit.

jemalloc or tcmalloc would do this too, but they must be preloaded before Python starts (`LD_PRELOAD`), which
neither `make run` nor a pip-installed `noodle` can promise; glibc's own knobs can be set from inside the process
through `mallopt`, so that is what this does (by hand, through ctypes: no library exposes it):

- one arena (`M_ARENA_MAX`): a thread's own arena is a 64 MiB heap that hands anything bigger to `mmap` whatever
  the threshold, and the engine samples on a worker thread; with one arena it shares the main heap, which grows;
- `M_MMAP_THRESHOLD` 256 MiB: tensors below it (every activation of a 512x512 SD1.5 or SDXL run on the CPU)
  come from the heap and go back to it;
- `M_TRIM_THRESHOLD` 1 GiB: up to that much free memory at the heap's top stays for the next step.

The one arena must be set before the process starts its threads: a thread that ends leaves its arena on a free
list, and the next thread takes that one whatever the limit. `noodle` does it first thing (`reuse_for`, from
bot/cli.py); `create_executor` does it again for anyone who embeds the engine, which holds for threads started
after it.

What is kept is returned to the system (`malloc_trim`) when a model is unloaded or evicted, so a checkpoint's
weights never linger, and when the local worker's queue has been quiet for half a minute (engine/queue/worker.py);
between jobs of a burst the memory stays, which is the point. The heap holds a few copies of the largest
step's activations at most: aligned allocations leave gaps that the next one of the same size may not fit.
Off with `[engine] reuse_cpu_memory = false`; nothing is done where the C library is not glibc (macOS, musl) or
the engine's device is not the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform
from functools import cache

import torch

from engine.device import pick_device
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MIB = 1024**2
MMAP_THRESHOLD = 256 * MIB
TRIM_THRESHOLD = 1024 * MIB

_applied = False


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose `mallopt` takes these parameters), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """Keep freed CPU memory in the process for the next allocation (see the module's text). True when it holds:
    the C library is glibc and it took every setting; calling again does nothing more."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    taken = [libc.mallopt(param, value) == 1 for param, value in settings]
    _applied = all(taken)
    if not _applied:
        log.warning("glibc refused a malloc setting (%s); CPU sampling runs without memory reuse", taken)
    return _applied


def reuse_for(engine: EngineSettings) -> bool:
    """Switch the reuse on when config.toml allows it and this process samples on the CPU (a local worker whose
    device is, or resolves to, the CPU). True when it holds."""
    if not engine.reuse_cpu_memory or engine.workers != "local":
        return False
    try:
        device = pick_device(engine.device)
    except RuntimeError:  # cuda asked for and absent: the executor says so when it is built
        return False
    return device.type == "cpu" and reuse_freed_memory()


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (after a model is loaded, unloaded or evicted, and when the
    local worker's queue has been quiet)."""
    libc = _glibc()
    if libc is not None and _applied:
        libc.malloc_trim(0)


def free_cached_memory(device: torch.device) -> None:
    """Give back what is no longer referenced: Python's cycles, this heap's kept pages, the GPU allocator's cache
    (after a model is unloaded, or before a VAE retries a picture in tiles)."""
    gc.collect()
    return_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def reusing() -> bool:
    """Whether this process keeps its freed CPU memory (`noodle bench comfy` reports it)."""
    return _applied
