"""A1111's short "Model hash" (the first 10 hex digits of the whole file's sha256), remembered across restarts.

Hashing a 7 GB SDXL file takes seconds, and the hash goes into every result's PNG parameters and
card: without a memory the first job on each checkpoint after every restart would pay for it
(A1111 keeps its hashes in a cache.json for the same reason). Digests are kept in memory and, when
a file is configured (`[models] hash_cache`), in a small JSON file keyed by the resolved path, the
size and the modification time, so a replaced or rewritten model file is hashed again. The file is
only a cache: unreadable or corrupt, it is ignored and rewritten. Each `ModelCatalog`
(engine/models/paths.py) owns one book; there is no process-wide one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

__all__ = ["HashBook", "sha256_prefix"]


def sha256_prefix(path: Path) -> str:
    """The first 10 hex digits of the file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


class HashBook:
    """Short hashes by (path, size, mtime), in memory and optionally in a JSON file; safe across threads."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = file
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}
        self._loaded = False

    def short_hash(self, path: Path) -> str:
        """The file's short hash: remembered if its path, size and mtime are, else computed and remembered."""
        real = Path(path).resolve()
        stat = real.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        with self._lock:
            self._load()
            if key in self._known:
                return self._known[key]
        digest = sha256_prefix(real)  # outside the lock: other files' lookups need not wait for this one
        with self._lock:
            self._known[key] = digest
            self._save()
        return digest

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.file is None:
            return
        try:
            stored = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(stored, dict):
            self._known.update({k: v for k, v in stored.items() if isinstance(k, str) and isinstance(v, str)})

    def _save(self) -> None:
        if self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self._known, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.file)  # atomic: another process reading it sees the old or the new file
        except OSError:
            pass  # a read-only disk costs a re-hash after the next restart, nothing more
