"""CPU memory reuse (engine/heap.py): freed tensors stay in the process, a model's unload gives them back, and the
pictures do not change. Each check runs in a fresh interpreter: the settings are process-wide and one-way."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.heap import reuse_for
from engine.settings import EngineSettings
from tests.engine.conftest import txt2img
from tests.engine.test_cli import noodle

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the reuse tunes glibc's malloc")

# A worker thread (the engine samples on one) allocates and frees a 96 MiB tensor, the reuse on (switched on first,
# as `noodle` does) or off; glibc's own counters say whether it came from mmap, and /proc what stays resident.
PROBE = r"""
import ctypes, json, sys, threading, torch
from engine import heap

reusing = sys.argv[1] == "reuse" and heap.reuse_freed_memory()

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def allocate(report):
    mapped = libc.mallinfo2().hblkhd
    tensor = torch.ones(24 * 2**20)  # 96 MiB, every page touched
    report["mmapped_mib"].append((libc.mallinfo2().hblkhd - mapped) / 2**20)
    del tensor

report = {"reusing": reusing, "start_mib": resident_mib(), "mmapped_mib": [], "resident_mib": []}
for job in range(8):  # one thread a job, as the engine's worker: the next job finds the memory still there
    worker = threading.Thread(target=allocate, args=(report,))
    worker.start()
    worker.join()
    report["resident_mib"].append(resident_mib())
heap.return_freed_memory()
report["trimmed_mib"] = resident_mib()
print(json.dumps(report))
"""


def probe(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_freed_tensor_stays_in_the_heap_for_the_next_job_until_a_trim() -> None:
    default = probe("default")
    assert default["reusing"] is False
    assert min(default["mmapped_mib"]) >= 90  # glibc's default: a big tensor is its own mapping...
    assert max(default["resident_mib"]) - default["start_mib"] < 16  # ...unmapped on free, faulted in anew

    reused = probe("reuse")
    assert reused["reusing"] is True
    assert max(reused["mmapped_mib"]) == 0  # from the heap
    kept = [mib - reused["start_mib"] for mib in reused["resident_mib"]]
    assert kept[0] >= 80, reused  # it stays resident after the free...
    # ...and later jobs reuse it: the heap holds a few copies at most (glibc's aligned allocations leave gaps the
    # next one of the same size may not fit: 3 copies after 8 jobs here, 4 after 40), never one per job
    assert kept[-1] <= 4 * 96 + 16, reused
    assert reused["trimmed_mib"] - reused["start_mib"] < 16, reused  # a model's unload gives it all back


@pytest.mark.slow
def test_the_picture_is_the_same_bit_for_bit_with_and_without_the_reuse(tiny_models: Path, tmp_path: Path) -> None:
    workflow = tmp_path / "wf.json"
    workflow.write_text(json.dumps(txt2img(seed=11)))
    pictures = []
    for reuse in ("true", "false"):
        out = tmp_path / f"out-{reuse}"
        os.environ["NOODLE_ENGINE__REUSE_CPU_MEMORY"] = reuse
        try:
            done = noodle("run", str(workflow), "--models", str(tiny_models), "--out", str(out), cwd=tmp_path)
        finally:
            del os.environ["NOODLE_ENGINE__REUSE_CPU_MEMORY"]
        assert done.returncode == 0, done.stderr
        [image] = json.loads(done.stdout)["outputs"]["9"]["images"]
        pictures.append(np.asarray(Image.open(out / image["subfolder"] / image["filename"])))
    assert pictures[0].shape == pictures[1].shape
    assert np.array_equal(pictures[0], pictures[1])


def test_only_a_local_cpu_engine_asks_for_it() -> None:
    assert reuse_for(EngineSettings(reuse_cpu_memory=False, device="cpu")) is False
    assert reuse_for(EngineSettings(workers="ray", device="cpu")) is False  # this process only validates
    if not torch.cuda.is_available():
        assert reuse_for(EngineSettings(device="cuda")) is False  # the executor reports the missing card
