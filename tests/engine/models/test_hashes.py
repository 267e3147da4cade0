"""A1111's short model hash: sha256 of the whole file, remembered across restarts and redone for a changed file.

Each model catalog owns its book: a restart is a new catalog (or book) on the same hash file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from engine.models import hashes
from engine.models.hashes import HashBook
from engine.models.paths import ModelCatalog


def test_the_hash_is_a1111s_and_is_kept_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights" * 1000)
    book_file = tmp_path / "cache" / "hashes.json"
    expected = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert HashBook(book_file).short_hash(model) == expected
    assert list(json.loads(book_file.read_text()).values()) == [expected]

    # a new process (a new book on the same file) does not read the model again
    reads: list[Path] = []
    monkeypatch.setattr(hashes, "sha256_prefix", lambda path: reads.append(path) or "computed")
    assert HashBook(book_file).short_hash(model) == expected and reads == []

    # a rewritten file is hashed again (its size or mtime changed)
    model.write_bytes(b"other weights")
    os.utime(model, ns=(1, 1))
    assert HashBook(book_file).short_hash(model) == "computed" and len(reads) == 1


def test_a_broken_or_unwritable_cache_costs_only_a_rehash(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x" * 10)
    book_file = tmp_path / "hashes.json"
    book_file.write_text("{not json")
    expected = hashlib.sha256(b"x" * 10).hexdigest()[:10]
    assert HashBook(book_file).short_hash(model) == expected
    assert json.loads(book_file.read_text())  # rewritten whole
    assert HashBook(tmp_path / "missing-dir" / "x" / "hashes.json").short_hash(model) == expected
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert HashBook(blocked / "hashes.json").short_hash(model) == expected  # cannot be written: still answers
    assert HashBook(None).short_hash(model) == expected


def test_each_catalog_keeps_its_hashes_in_its_own_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "models" / "checkpoints" / "m.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert ModelCatalog(tmp_path / "models", hash_cache=first).short_hash(model) == expected
    assert list(json.loads(first.read_text()).values()) == [expected] and not second.exists()

    # after a restart (a new catalog on the same file) the model is not read again ...
    reads: list[Path] = []
    monkeypatch.setattr(hashes, "sha256_prefix", lambda path: reads.append(path) or "computed")
    assert ModelCatalog(tmp_path / "models", hash_cache=first).short_hash(model) == expected and reads == []
    # ... while a catalog with another file, or none, knows nothing of the first one's hashes
    assert ModelCatalog(tmp_path / "models", hash_cache=second).short_hash(model) == "computed"
    assert ModelCatalog(tmp_path / "models").short_hash(model) == "computed" and len(reads) == 2
