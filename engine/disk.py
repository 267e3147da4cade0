"""Disk space: the free-space check every write of Noodle's makes first, and the message a full disk gives.

A PNG, an uploaded image and the SQLite file share one rule: keep `[limits] min_free_disk_mb` free, so a
member's job is refused before the disk fills and the database (results, the queue) keeps room to record
it. When the disk fills anyway (another program, a race), `is_disk_full` recognises the error however
it surfaced (ENOSPC from a write, SQLITE_FULL from a COMMIT) so the job fails with `disk_full_message`.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

from engine.errors import NoodleError

__all__ = ["MIB", "DiskFull", "check_free_space", "disk_full_message", "is_disk_full"]

MIB = 1024 * 1024
# ENOSPC: the filesystem is full; EDQUOT: the user's quota is; EFBIG: the file may not grow (RLIMIT_FSIZE)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFull(NoodleError):
    """A write was refused (too little free space) or failed (the disk filled) on the disk holding a folder."""


def _existing(folder: Path) -> Path:
    """`folder` or its nearest existing parent: the disk a folder not made yet will be on."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_free_space(folder: Path, keep_mb: int, need_bytes: int = 0, *, label: str | None = None) -> None:
    """Refuse (DiskFull) a write of `need_bytes` into `folder` that would leave under `keep_mb` MiB free.

    `keep_mb` 0 turns the check off: writes go on until the disk is full, and a full disk still fails only the
    job that hit it (the write's own error, told through `disk_full_message`)."""
    if keep_mb <= 0:
        return
    free = shutil.disk_usage(_existing(Path(folder))).free
    if free - need_bytes >= keep_mb * MIB:
        return
    name = label or f"{Path(folder).name}/"
    need = f", this write needs up to {-(-need_bytes // MIB)} MiB" if need_bytes >= MIB else ""
    raise DiskFull(f"the disk holding {name} has {free // MIB} MiB free{need}; Noodle keeps {keep_mb} MiB free "
                   "([limits] min_free_disk_mb in config.toml): free space or lower it")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or the SQLite file) is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFull):
            return True
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        # SQLITE_FULL has no errno of its own in Python: sqlite_errorcode where it exists (3.11+), else the text
        if isinstance(err, sqlite3.Error) and (getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                               or "database or disk is full" in str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(err: BaseException, label: str) -> str:
    """What the owner of a job is told when the disk holding `label` filled while it wrote."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return (f"the disk holding {label} is full ({reason}); nothing of this job was kept: free space on it "
            "(or ask the server owner to), then run it again")
