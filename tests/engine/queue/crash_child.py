"""A child process for test_service_crash: an EngineService on the tiny models, killed by the test with SIGKILL.

    python -m tests.engine.queue.crash_child DB MODELS OUT [--submit N]

Prints one JSON line for each thing the parent waits on: {"submitted": [...ids], "order": [...ids]} after
submitting, then {"running": id} once a job is running (stored as running, at its first sampler step).
The first job this process runs then hangs in its sampler (a test hook) until the parent kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"


def say(**line: Any) -> None:
    print(json.dumps(line), flush=True)


async def main(args: argparse.Namespace) -> int:
    from engine import samplers
    from engine.executor import create_executor
    from engine.queue import EngineService, Owner
    from engine.settings import EngineSettings, Limits, ModelsSettings, QueueSettings
    from tests.engine.conftest import txt2img

    original, hang = samplers.sample, threading.Event()

    def sample(plan: Any, eps_fn: Any, latent: Any, noise: Any, *, callback: Any = None, **options: Any) -> Any:
        def held(index: int, total: int, x: Any) -> None:
            callback(index, total, x)
            hang.wait(300)  # until SIGKILL; the parent's timeout is far shorter

        return original(plan, eps_fn, latent, noise, callback=held, **options)

    samplers.sample = sample
    executor = create_executor(ModelsSettings(dir=args.models), EngineSettings(output_dir=args.out, device="cpu"),
                               Limits())
    service = EngineService(executor, args.db, QueueSettings(batch_max=1))
    events = service.subscribe()  # before start: a resumed job may start at once
    await service.start()
    if args.submit:
        users = [Owner("ann"), Owner("ann"), Owner("bob"), Owner("ann")]
        ids = [(await service.submit(txt2img(seed=n), users[n % len(users)])).job_id for n in range(args.submit)]
        say(submitted=ids, order=[info.job_id for info in service.jobs()])
    async with asyncio.timeout(300):
        async for event in events:
            if event.kind == "progress":
                say(running=event.job_id, order=[info.job_id for info in service.jobs()])
                break
        await asyncio.Event().wait()  # the parent kills this process here
    return 3


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db", type=Path)
    parser.add_argument("models", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--submit", type=int, default=0)
    sys.exit(asyncio.run(main(parser.parse_args())))
