"""Writing a .safetensors file that the rest of the box can read, as every other file Noodle writes.

safetensors 0.8's `save_file` creates its file with mode 0600 whatever the umask (measured here: 0o600 under umask
022), so a checkpoint `noodle convert` wrote into the models folder, a CheckpointSave or a SaveLatent result could
be read by no other user: a bot run as a service account, or a ComfyUI beside it, failed with "permission
denied" on a file an `ls` shows. `save_safetensors` writes it and then gives it the mode an ordinary `open()`
would have (0666 less the umask).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["save_safetensors", "umask"]

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux's /proc/self/status);
    elsewhere set and put back under a lock (another thread's file made in between could get a wider mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path | str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """`save_file`, then the mode of a file `open()` makes here."""
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata is not None else None)
    os.chmod(path, 0o666 & ~umask())
