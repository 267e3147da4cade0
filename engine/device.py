"""Device and precision from config: `auto` takes cuda, then mps, then cpu; fp16 on a GPU, fp32 on the CPU."""

from __future__ import annotations

import os

import torch


def pick_device(setting: str = "auto") -> torch.device:
    """The torch device named in config, or the best one present for `auto`."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device = 'cuda' in config.toml, but torch sees no CUDA device; "
                           "install a CUDA build of torch (see README) or set engine.device = 'auto'")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp16 on GPUs, fp32 on the CPU (CPU half precision is slow and lossy), unless config says otherwise."""
    if setting == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[setting]


def memory_budget(device: torch.device, configured: int = 0) -> int:
    """Bytes the loaded checkpoints may take: the configured number, else half the device's memory."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.6)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3
