"""A genuinely full disk for tests: a small tmpfs mounted for one test, filled to the last byte and freed again.

Mounting needs root (or CAP_SYS_ADMIN); where it is refused the test using `small_disk` skips and says why.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["SmallDisk", "small_disk"]


class SmallDisk:
    """A 16 MiB tmpfs mounted at `root`; `fill` takes every free byte into one file, `free` gives them back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self, leave: int = 0) -> None:
        """Fill the disk, then give back `leave` bytes (the disk keeps exactly that little room)."""
        # unbuffered: a buffered file would raise ENOSPC again when it closes, with the bytes it kept
        with open(self.filler, "ab", buffering=0) as file:
            for size in (1 << 20, 1 << 16, 4096, 512, 64, 1):
                while True:
                    try:
                        file.write(bytes(size))
                    except OSError as err:
                        assert err.errno == errno.ENOSPC, err
                        break
            if leave:
                file.truncate(file.seek(0, 2) - leave)

    def free(self) -> None:
        """Give every byte back."""
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 16 MiB tmpfs at tmp_path/disk for this test; skips where mounting is not permitted."""
    root = tmp_path / "disk"
    root.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root)],
                                 capture_output=True, text=True, check=False, timeout=30)
        said = " ".join(mounted.stderr.split()) or f"exit status {mounted.returncode}"
        refused = said if mounted.returncode else None
    except (OSError, subprocess.TimeoutExpired) as err:  # no mount(8) at all
        refused = str(err)
    if refused:
        pytest.skip(f"cannot mount a tmpfs here ({refused}): a full disk needs root; the free-space check and "
                    "SQLite's max_page_count tests cover this machine")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
