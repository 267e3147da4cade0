"""GLIGEN and CLIP vision files that are no readable .safetensors: refused naming the file, pickles even when the
owner allows weights-only pickles elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import UnsafeModelFile, UnsupportedModel
from engine.models.clip_vision import read_clip_vision
from engine.models.gligen import read_gligen

READERS: dict[str, Callable[[Path, str], Any]] = {
    "GLIGEN file": read_gligen,
    "clip_vision file": lambda path, name: read_clip_vision(path, name, torch.device("cpu"), torch.float32),
}


@pytest.mark.parametrize("what", READERS)
@pytest.mark.parametrize("content", ["empty", "truncated"])
def test_an_unreadable_file_is_refused_naming_it(tiny_models: Path, tmp_path: Path, what: str, content: str) -> None:
    whole = (tiny_models / "checkpoints" / "tiny-sd15.safetensors").read_bytes()
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"" if content == "empty" else whole[:len(whole) // 3])
    with pytest.raises(UnsupportedModel, match=rf"^{what} 'broken.safetensors' could not be read as safetensors "
                                               r"\(.*\): it is empty, truncated or not a safetensors file"):
        READERS[what](path, "broken.safetensors")


@pytest.mark.parametrize("what", READERS)
def test_a_pickle_is_refused_as_one(tmp_path: Path, what: str) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(UnsafeModelFile, match=rf"^{what} 'weights.pth' is a pickle file \(.pth\).*`noodle convert` "
                                              r"\(it writes weights.safetensors beside it\)"):
        READERS[what](path, "weights.pth")
