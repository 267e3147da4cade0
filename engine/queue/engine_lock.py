"""One engine per database file: the queue's running jobs are the engine's own, so a second engine on the same
file would take them for jobs a crash left behind and run them again (a bot and a `noodle chat` pointed at one
file ran every job twice). The engine holds an exclusive lock on `<database>.engine-lock` while it runs; the
kernel lets go of it when the process ends, however it ends, so a crash never leaves the file locked.

Written by hand: SQLite's own locks last one transaction, not a process's lifetime. POSIX only (fcntl.flock); on
Windows the lock is not taken and one engine per file is the owner's to keep.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from engine.errors import EngineBusy

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["hold_engine_lock", "release_engine_lock"]


def hold_engine_lock(database: Path) -> IO[bytes] | None:
    """Lock `database` for this engine, or raise EngineBusy saying what to do; None where locks are not taken."""
    if fcntl is None:
        return None
    handle = open(database.with_name(database.name + ".engine-lock"), "ab")  # noqa: SIM115 (held while it runs)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise EngineBusy(f"another Noodle engine is running on {database} (a bot, `noodle chat` or `noodle main` "
                         "in another process): stop it first, or give this one its own database (--db, or [bot] "
                         "database in config.toml)") from None
    return handle


def release_engine_lock(handle: IO[bytes] | None) -> None:
    if handle is not None:
        handle.close()  # closing the file lets go of its lock
