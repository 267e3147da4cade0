"""`noodle bench cluster`: engine workers on a local Ray cluster, measured side by side in one run on the tiny models.

(a) loads: one mixed stream of jobs over 3 checkpoints on 2 workers, each with room for one checkpoint (as a
    GPU holds one SDXL), routed by held models against round-robin, 3 runs of each interleaved: checkpoint loads;
(b) throughput: jobs whose sampling dominates on 2 workers of 1 CPU each, against 1 worker of 1 CPU and 1 worker
    of both CPUs (on 2 cores two workers share the same cores one worker could use; on 2 GPUs they do not);
(c) dispatch overhead: a small job's time from submit to result on one Ray worker less the same on the in-process
    engine, interleaved (both warm, both on two CPU threads; their node caches bypassed by a new seed each time);
(d) recovery: a worker killed (SIGKILL) mid-job while 6 jobs wait: every job done, how long until the killed job
    is done elsewhere, and until the replacement worker is up.

The last line is a JSON object for scripts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.cluster.dispatcher import ClusterConfig
from engine.executor import create_executor
from engine.queue.jobs import Owner
from engine.queue.service import EngineService
from engine.settings import EngineSettings, Limits, ModelsSettings, QueueSettings, RaySettings
from engine.templates import WorkflowParams, build_workflow
from engine.tiny import write_tiny_models

__all__ = ["bench_cluster"]

CHECKPOINTS = ("tiny-sd15.safetensors", "tiny-sd15-b.safetensors", "tiny-sd2-v.safetensors")
ONE_CHECKPOINT_BYTES = 20 * 2**20  # a tiny checkpoint is 12-13 MB in memory: room for one, not two
STREAM, WORK_JOBS, OVERHEAD_RUNS, LOAD_RUNS = 36, 12, 15, 3
PASSED = re.compile(r"passed over (\d+) times")


def _job(checkpoint: str, seed: int, *, size: int = 64, steps: int = 4, prefix: str = "bench") -> dict[str, Any]:
    return build_workflow(WorkflowParams(checkpoint=checkpoint, prompt=f"a lighthouse at dusk {seed % 5}", seed=seed,
                                         steps=steps, width=size, height=size, filename_prefix=prefix))


class _Bench:
    def __init__(self, models: Path, root: Path) -> None:
        self.models, self.root = models, root
        self.runs = 0

    async def service(self, *, workers: int = 0, cpus: float = 1.0, batch_max: int = 1,
                      memory: int = 0, **ray: Any) -> EngineService:
        self.runs += 1
        where = self.root / f"run{self.runs}"
        engine = EngineSettings(output_dir=where / "output", input_dir=where / "input", device="cpu",
                                model_memory_bytes=memory)
        models = ModelsSettings(dir=self.models)
        executor = create_executor(models, engine, Limits())
        queue = QueueSettings(batch_max=batch_max, per_user_max=100, global_max=200)
        cluster = ClusterConfig(RaySettings(workers=workers, cpus_per_worker=cpus, **ray), models) if workers else None
        service = EngineService(executor, where / "jobs.sqlite3", queue, cluster)
        await service.start()
        return service

    async def loads(self, routing: str, patience: int | None = None) -> dict[str, Any]:
        tuning = {} if patience is None else {"routing_patience": patience}
        service = await self.service(workers=2, memory=ONE_CHECKPOINT_BYTES, routing=routing, **tuning)
        try:
            pick = random.Random(17)  # the same stream for both routings
            started = time.perf_counter()
            # a burst, as when a server's members all ask at once: what the queue holds is what routing can use
            handles = await asyncio.gather(*(service.submit(_job(pick.choice(CHECKPOINTS), n), Owner(f"user{n % 3}"))
                                             for n in range(STREAM)))
            results = [await handle.result(600) for handle in handles]
            seconds = time.perf_counter() - started
            loads = sum(worker.loads for worker in service.workers())
            reasons = [r["meta"]["worker"]["reason"] for r in results]
            return {"loads": loads, "seconds": seconds, "jobs": len(results),
                    "held": sum(reason.startswith("holds") for reason in reasons),
                    "most_passed_over": max((int(m[1]) for r in reasons if (m := PASSED.search(r))), default=0)}
        finally:
            await service.stop()

    async def throughput(self, workers: int, cpus: float) -> float:
        """Jobs per second on jobs whose sampling dominates (128 px, 20 steps), once each worker is warm."""
        service = await self.service(workers=workers, cpus=cpus)
        try:
            warm = [await service.submit(_job(CHECKPOINTS[0], 1000 + n), Owner(f"w{n}")) for n in range(workers)]
            for handle in warm:
                await handle.result(600)
            started = time.perf_counter()
            handles = [await service.submit(_job(CHECKPOINTS[0], n, size=128, steps=20), Owner(f"user{n % 4}"))
                       for n in range(WORK_JOBS)]
            for handle in handles:
                await handle.result(600)
            return WORK_JOBS / (time.perf_counter() - started)
        finally:
            await service.stop()

    async def latency(self) -> tuple[list[float], list[float]]:
        """Seconds from submit to result of a small job, one at a time, warm, on the in-process engine and on one
        Ray worker with the same two CPU threads, interleaved."""
        local, remote = await self.service(), await self.service(workers=1, cpus=2.0)
        times: tuple[list[float], list[float]] = ([], [])
        try:
            for n in range(OVERHEAD_RUNS + 2):
                for service, kept in ((local, times[0]), (remote, times[1])):
                    started = time.perf_counter()
                    await (await service.submit(_job(CHECKPOINTS[0], 5000 + n, steps=1), Owner("u"))).result(600)
                    if n >= 2:  # the first load, and a first run of each node
                        kept.append(time.perf_counter() - started)
            return times
        finally:
            await local.stop()
            await remote.stop()

    async def recovery(self) -> dict[str, Any]:
        service = await self.service(workers=2)
        try:
            events = service.subscribe()
            long = await service.submit(_job(CHECKPOINTS[0], 77, steps=150), Owner("victim"))
            others = [await service.submit(_job(CHECKPOINTS[0], 80 + n, steps=10), Owner(f"user{n}"))
                      for n in range(6)]
            async for event in events:
                if event.job_id == long.job_id and event.kind == "progress":
                    break
            runner = service._runner
            assert runner is not None
            victim = next(w for w in runner._workers if any(j.job_id == long.job_id for j in w.running))
            assert victim.facts is not None
            os.kill(victim.facts.pid, signal.SIGKILL)
            killed = time.perf_counter()
            result = await long.result(600)
            rerun = time.perf_counter() - killed
            done = [await handle.result(600) for handle in others]
            while sum(w.state in ("idle", "running") for w in service.workers()) < 2:
                await asyncio.sleep(0.05)
            replaced = time.perf_counter() - killed
            return {"jobs_done": 1 + len(done), "jobs_submitted": 7, "killed_job_done_after_s": rerun,
                    "replacement_up_after_s": replaced, "killed": victim.name,
                    "reran_on": result["meta"]["worker"]["name"]}
        finally:
            await service.stop()


async def _run(models: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="noodle-bench-cluster-") as tmp:
        bench = _Bench(models, Path(tmp))
        fair = await bench.loads("models", patience=0)
        runs = [(await bench.loads("round_robin"), await bench.loads("models")) for _ in range(LOAD_RUNS)]
        # the median run of each: when the burst's first jobs start, the queue is still filling, so runs vary
        turns = sorted((t for t, _ in runs), key=lambda r: r["loads"])[LOAD_RUNS // 2]
        routed = sorted((r for _, r in runs), key=lambda r: r["loads"])[LOAD_RUNS // 2]
        patience = RaySettings().routing_patience
        print(f"(a) {STREAM} jobs over {len(CHECKPOINTS)} checkpoints at once, 2 workers with room for one each "
              f"(median of {LOAD_RUNS} runs; routed: {sorted(r['loads'] for _, r in runs)}, round-robin: "
              f"{sorted(t['loads'] for t, _ in runs)}):")
        print(f"    checkpoint loads: routed {routed['loads']} (patience {patience}), round-robin {turns['loads']} "
              f"({turns['loads'] / max(1, routed['loads']):.1f}x fewer); routed in the fair order (patience 0) "
              f"{fair['loads']} ({turns['loads'] / max(1, fair['loads']):.1f}x fewer)")
        print(f"    jobs that found their checkpoint held: {routed['held']} vs {turns['held']}; wall {routed['seconds']:.1f}"
              f" s vs {turns['seconds']:.1f} s; a job passed over at most {routed['most_passed_over']} times "
              f"({patience} by routing_patience, then while the busy worker holding its checkpoint finished a job)")
        one_slot, one_both, two = (await bench.throughput(1, 1.0), await bench.throughput(1, 2.0),
                                   await bench.throughput(2, 1.0))
        print(f"(b) {WORK_JOBS} jobs of 128 px x 20 steps: 2 workers x 1 CPU {two:.2f} jobs/s, 1 worker x 1 CPU "
              f"{one_slot:.2f} ({two / one_slot:.2f}x), 1 worker x 2 CPUs {one_both:.2f} ({two / one_both:.2f}x)")
        local, remote = await bench.latency()
        overhead = (statistics.median(remote) - statistics.median(local)) * 1000
        print(f"(c) a 1-step 64 px job, submit to result, median of {OVERHEAD_RUNS}: in-process "
              f"{statistics.median(local) * 1000:.1f} ms, on a Ray worker {statistics.median(remote) * 1000:.1f} ms: "
              f"dispatch overhead {overhead:.1f} ms per job")
        recovery = await bench.recovery()
        print(f"(d) a worker killed mid-job with 6 jobs waiting: {recovery['jobs_done']} of "
              f"{recovery['jobs_submitted']} jobs done; the killed job done on {recovery['reran_on']} "
              f"{recovery['killed_job_done_after_s']:.1f} s after the kill; replacement up after "
              f"{recovery['replacement_up_after_s']:.1f} s")
        return {"loads_routed": routed["loads"], "loads_round_robin": turns["loads"], "loads_fair_order": fair["loads"],
                "throughput_2x1": two, "throughput_1x1": one_slot, "throughput_1x2": one_both,
                "dispatch_overhead_ms": overhead, **recovery}


def bench_cluster(models: Path) -> int:
    """Print the four measures and a JSON line; 0."""
    import ray

    write_tiny_models(models)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private cluster for this run, gone at its end
    temp = tempfile.mkdtemp(prefix="ray-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False, namespace="noodle-bench")
    try:
        print(json.dumps(asyncio.run(_run(models))))
    finally:
        ray.shutdown()
    return 0
