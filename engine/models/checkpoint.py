"""`LoadedCheckpoint`: one checkpoint file in memory, as the model manager keeps it and MODEL/CLIP values name it.

It lives below both the manager (engine/models/manager.py) and the values (engine/values.py), so the values
can name a checkpoint without importing the manager that loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import DiffusionPipeline

from engine.models.detect import Arch

__all__ = ["LoadedCheckpoint"]


@dataclass
class LoadedCheckpoint:
    """One checkpoint file in memory: its pipeline (all components) and what identifies it."""

    name: str
    path: Path
    arch: Arch
    pipe: DiffusionPipeline
    fingerprint: str
    load_seconds: float
    nbytes: int
    used: int = 0  # the manager's clock when last loaded or run: the least recently used goes first

    @property
    def key(self) -> str:
        return f"checkpoint:{self.name}:{self.fingerprint}"
