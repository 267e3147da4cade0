"""`noodle worker --address ...`: a second process (as another machine would) adds its own worker to the running
cluster; the bot takes it into use, or refuses it, naming the model file that differs."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from engine.queue import Owner
from tests.engine.conftest import txt2img
from tests.engine.queue.service_support import TIMEOUT, next_event

pytestmark = pytest.mark.slow  # a child interpreter, and a worker process it starts

REPO = Path(__file__).resolve().parents[3]


class WorkerCommand:
    """`noodle worker` in a child process with a config.toml of its own; its output read on a thread."""

    def __init__(self, ray: Any, root: Path, models: Path, name: str, engine: str = "") -> None:
        config = root / f"{name}.toml"
        config.write_text(f'[models]\ndir = "{models}"\n[engine]\ndevice = "cpu"\n{engine}'
                          f'[ray]\nnamespace = "{ray.get_runtime_context().namespace}"\n')
        env = {**os.environ, "NOODLE_CONFIG": str(config), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker", "--address", ray.get_runtime_context().gcs_address,
             "--name", name], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip())

    async def line_with(self, text: str) -> str:
        seen = []
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = await asyncio.to_thread(self.lines.get)
                seen.append(line)
                if text in line:
                    return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def test_a_joined_worker_takes_jobs(cluster_env: Any, ray_cluster: Any, tmp_path: Path) -> None:
    service = await cluster_env.start(workers=1, join_poll_seconds=0.2)
    command = WorkerCommand(ray_cluster, tmp_path, cluster_env.models, "box-b")
    try:
        await command.line_with("engine worker box-b up on")
        async with asyncio.timeout(TIMEOUT):
            while not any(w.name == "box-b" and w.state == "idle" for w in service.workers()):
                await asyncio.sleep(0.05)
        [joined] = [w for w in service.workers() if w.joined]
        assert joined.name == "box-b"
        first = await service.submit(txt2img(steps=150, seed=31, negative="keeps one busy"), Owner("u1"))
        await next_event(first.events(), "progress")
        second = await service.submit(txt2img(seed=32), Owner("u2"))  # the free one: the joined worker
        result = await second.result(TIMEOUT)
        assert result["meta"]["worker"]["name"] == "box-b"
        assert (cluster_env.executor.settings.output_dir / result["outputs"]["9"]["images"][0]["filename"]).is_file()
        await first.result(TIMEOUT)
    finally:
        command.stop()
    async with asyncio.timeout(TIMEOUT):  # its command ended: the bot notices and stops giving it jobs
        while any(w.name == "box-b" and w.state in ("idle", "running") for w in service.workers()):
            await asyncio.sleep(0.05)


async def test_a_worker_whose_models_differ_is_refused_naming_the_file(cluster_env: Any, ray_cluster: Any,
                                                                       tmp_path: Path) -> None:
    service = await cluster_env.start(workers=1, join_poll_seconds=0.2)
    models = tmp_path / "other-models"
    shutil.copytree(cluster_env.models, models)
    lora = models / "loras" / "tiny-lora-a.safetensors"
    lora.write_bytes(lora.read_bytes()[:-1] + b"\x00")
    command = WorkerCommand(ray_cluster, tmp_path, models, "box-c")
    try:
        line = await command.line_with("the bot refused box-c")
        assert "loras/tiny-lora-a.safetensors (hash" in line and "differs" in line
        assert await asyncio.to_thread(command.process.wait, TIMEOUT) == 1
    finally:
        command.stop()
    [refused] = [w for w in service.workers() if w.name == "box-c"]
    assert refused.state == "refused" and "loras/tiny-lora-a.safetensors" in refused.note


async def test_a_worker_that_reads_prompts_otherwise_is_refused_naming_the_setting(cluster_env: Any, ray_cluster: Any,
                                                                                   tmp_path: Path) -> None:
    """Its [engine] prompt_syntax differs from the bot's: a long prompt would break into other chunks there, and a
    reroll's picture would change with the machine it lands on."""
    service = await cluster_env.start(workers=1, join_poll_seconds=0.2)
    command = WorkerCommand(ray_cluster, tmp_path, cluster_env.models, "box-d", engine='prompt_syntax = "comfy"\n')
    try:
        line = await command.line_with("the bot refused box-d")
        assert "prompt_syntax = 'comfy' (the bot's is 'noodle')" in line
        assert await asyncio.to_thread(command.process.wait, TIMEOUT) == 1
    finally:
        command.stop()
    [refused] = [w for w in service.workers() if w.name == "box-d"]
    assert refused.state == "refused" and "prompt_syntax" in refused.note
