"""A real local Ray cluster for the module's tests, and engine services whose jobs run on its workers.

The cluster starts once per module (about 5 s): token authentication off and its files in a short temp folder
of its own (Ray's socket paths must stay under 108 bytes), so CI needs nothing else. Each service starts its own
workers (a few seconds: each is a process that imports torch) and stops them at the end of its test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_executor
from tests.engine.queue.service_support import TIMEOUT

CLUSTER_CPUS = 3  # two workers of the bot's, and one a `noodle worker` process adds


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             namespace=f"noodle-test-{os.getpid()}")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


class ClusterEnv:
    """Services over one database in tmp_path whose jobs run on the module's Ray cluster."""

    def __init__(self, models: Path, root: Path) -> None:
        self.models, self.root = models, root
        self.executor = tiny_executor(models, root)
        self.db = root / "jobs.sqlite3"
        self.services: list[Any] = []

    async def start(self, *, workers: int = 2, queue: dict[str, Any] | None = None, **ray: Any) -> Any:
        from engine.cluster.dispatcher import ClusterConfig
        from engine.queue import EngineService
        from engine.settings import ModelsSettings, QueueSettings, RaySettings

        config = ClusterConfig(RaySettings(workers=workers, **ray), ModelsSettings(dir=self.models))
        service = EngineService(self.executor, self.db, QueueSettings(**(queue or {})), config)
        await service.start()
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.stop(timeout=TIMEOUT)


@pytest.fixture
async def cluster_env(ray_cluster: Any, tiny_models: Path, tmp_path: Path) -> Any:
    env = ClusterEnv(tiny_models, tmp_path)
    try:
        yield env
    finally:
        await env.close()
