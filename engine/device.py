"""Device and precision from config: `auto` takes cuda, then mps, then cpu; fp16 on a GPU, fp32 on the CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch

from engine.errors import DeviceUnavailable


def pick_device(setting: str = "auto") -> torch.device:
    """The torch device named in config, or the best one present for `auto`."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("engine.device = 'cuda' in config.toml, but torch sees no CUDA device; "
                           "install a CUDA build of torch (see README) or set engine.device = 'auto'")
    return torch.device(setting)


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp16 on GPUs, fp32 on the CPU (CPU half precision is slow and lossy), unless config says otherwise."""
    if setting == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return DTYPES[setting]


# AMD cards that run bfloat16 only emulated (RDNA2 and older; comfy/model_management.py should_use_bf16's list)
AMD_WITHOUT_BF16 = ("gfx1030", "gfx1031", "gfx1010", "gfx1011", "gfx1012", "gfx906", "gfx900", "gfx803")


def cpu_runs_bf16() -> bool:
    """Whether this CPU does bfloat16 matrix work in hardware (Intel AMX and AVX512-BF16: Sapphire Rapids and
    newer). There a full-size SD1.5 job in bfloat16 took half the float32 time (7.8 s against 15.3 s at 256x256,
    8 steps, on this project's 2-core machine), its picture 49 dB PSNR from float32's."""
    amx, bf16 = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return bool(amx is not None and bf16 is not None and amx() and bf16())


def runs_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 at full speed: by ComfyUI's rule an NVIDIA card of compute capability 8
    (Ampere) or newer, an AMD card newer than RDNA2, Apple silicon on macOS 14 or later; and a CPU with AMX
    (ComfyUI never takes bfloat16 on a CPU; here it only matters where the owner set a half `dtype`)."""
    if device.type == "cuda":
        if torch.version.hip:
            return not any(arch in torch.cuda.get_device_properties(device).gcnArchName for arch in AMD_WITHOUT_BF16)
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "mps":
        return bool(torch.backends.mps.is_macos_or_newer(14, 0))
    return device.type == "cpu" and cpu_runs_bf16()


def pick_vae_dtype(setting: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision. `auto` is ComfyUI's (comfy/model_management.py vae_dtype for the SD VAEs, whose
    working dtypes are bfloat16 and float32): bfloat16 where the device runs it at full speed, else float32; and
    float32 when the engine itself is set to float32 (as ComfyUI's --force-fp32). bfloat16 has float32's range,
    so neither the SDXL VAE's fp16 overflow nor the SD1.x VAE's occasional one (a black picture) can happen, in
    half of float32's memory."""
    if setting != "auto":
        return DTYPES[setting]
    return torch.bfloat16 if dtype != torch.float32 and runs_bf16(device) else torch.float32


# A container's memory limit (cgroup v2, then v1): the machine's RAM is not what this process may use.
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
# ...and what the container uses now, page cache included (v2, then v1), beside its limit
CGROUP_USAGE_FILES = (Path("/sys/fs/cgroup/memory.current"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"))
GIB = 1024**3


def _machine_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume a modest machine
        return 16 * GIB


def _read_bytes(path: Path) -> int | None:
    """A cgroup file's number; None where it is missing or says "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _container_limit(path: Path, machine: int) -> int | None:
    limit = _read_bytes(path)
    return limit if limit is not None and 0 < limit < machine else None  # v1 says "no limit" with a huge number


def usable_ram(limit_files: Sequence[Path] = CGROUP_LIMIT_FILES) -> int:
    """Bytes of RAM this process may use: the machine's, or its container's limit when that is lower."""
    machine = _machine_ram()
    return min([machine, *(limit for path in limit_files if (limit := _container_limit(path, machine)))])


def available_ram(limit_files: Sequence[Path] = CGROUP_LIMIT_FILES,
                  usage_files: Sequence[Path] = CGROUP_USAGE_FILES) -> int:
    """Bytes of RAM a new allocation can take now without swapping or waking the kernel's OOM killer.

    The machine's available memory (psutil: Linux's MemAvailable, the free pages and the page cache it can drop),
    or less where a container's limit is nearer: the limit less the container's usage (which counts page cache the
    kernel would drop first, so this errs on the small side inside a container).
    """
    machine, available = _machine_ram(), psutil.virtual_memory().available
    for limit_file, usage_file in zip(limit_files, usage_files):
        limit, usage = _container_limit(limit_file, machine), _read_bytes(usage_file)
        if limit is not None and usage is not None:
            available = min(available, max(limit - usage, 0))
    return available


def is_out_of_memory(err: BaseException) -> bool:
    """A device or allocator out-of-memory error (CUDA's, MPS's "out of memory", the CPU's "can't allocate")."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_budget(device: torch.device, configured: int = 0) -> int:
    """Bytes the loaded checkpoints may take: the configured number, else a share of the device's memory.

    On CUDA the card's memory less room for activations and the VAE (a quarter, at least 2 GiB: SDXL at
    1024x1024 needs a few GiB beyond its weights); elsewhere (CPU, Apple's unified memory) half the RAM
    this process may use, so the OS, Python and the bot keep the rest.
    """
    if configured > 0:
        return configured
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(total - max(total // 4, 2 * GIB), total // 4)
    return usable_ram() // 2
