"""Queue fixtures: engine services on the session executor (tests/engine/conftest.py) over a fresh database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.executor import Executor
from tests.engine.queue.service_support import QueueEnv


@pytest.fixture
async def queue_env(executor: Executor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[QueueEnv]:
    """Engine services on the session executor over a database in tmp_path, with a gate (service_support)."""
    env = QueueEnv(executor, tmp_path / "noodle.sqlite3", monkeypatch)
    yield env
    await env.close()
