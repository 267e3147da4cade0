"""Files Noodle writes as .safetensors get the mode of any other file it writes (safetensors makes them 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.convert import convert_file
from engine.safetensors_file import save_safetensors, umask


@pytest.fixture
def group_readable() -> Iterator[int]:
    """umask 027 for the test (a service account's usual one), the old one after."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_being_changed(group_readable: int) -> None:
    assert umask() == group_readable
    assert os.umask(group_readable) == group_readable  # (os.umask returns the mask it replaces)


def test_a_written_file_has_the_mode_open_gives_not_0600(tmp_path: Path, group_readable: int) -> None:
    (tmp_path / "plain.txt").write_text("x")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "library.safetensors"))
    save_safetensors({"a": torch.ones(2)}, tmp_path / "ours.safetensors", {"format": "pt"})
    assert _mode(tmp_path / "library.safetensors") == 0o600  # why ours exists: the library's own mode
    assert _mode(tmp_path / "ours.safetensors") == _mode(tmp_path / "plain.txt") == 0o640
    assert torch.equal(load_file(tmp_path / "ours.safetensors")["a"], torch.ones(2))


def test_a_converted_checkpoint_is_as_readable_as_the_pickle_it_came_from(tmp_path: Path,
                                                                          group_readable: int) -> None:
    source = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, source)
    done = convert_file(source)
    assert _mode(done.target) == _mode(source) == 0o640
