"""`noodle bench gpu --comfy-source DIR`: the GPU figures of the speed issue in one run, for a machine lent for
minutes: Noodle against a ComfyUI it starts itself from DIR's source, then against diffusers' own pipeline.

1. Writes full-size SD1.5 and SDXL checkpoints with random weights into `--models` (kept between runs).
2. Starts ComfyUI from `DIR` (its main.py, with this Python) on 127.0.0.1, models from `--models`, no custom
   nodes and no web front end (`--front-end-root` an empty folder: only its HTTP API is timed). Where this
   Python has no PyAV, ComfyUI gets a module `av` that fails when it is used: only its video and audio nodes
   use it, at run time, and the image workflows timed here never do (its wheel, 34 MB, is too big to carry).
3. Times per family SD1.5 at 512² and SDXL at 1024², 20 steps, cfg 7, euler/normal and dpmpp_2m/karras, in
   Noodle (config.toml's [engine] default: fp16 on the GPU) and in that ComfyUI, as `noodle bench comfy`
   (engine/bench_comfy.py), with each side's peak memory. On a GPU the same workflows are timed again with
   [engine] cuda_graphs on (`comfy_cuda_graphs`).
4. Stops ComfyUI and runs `noodle bench engine --real-size sdxl`: Noodle's graph against diffusers' pipeline on
   the same components. Then, the figures the issue asks being in, the levers: each family's VAE decoding one
   picture of the timed size in float32, float16 and bfloat16 ([engine] vae_dtype), and one UNet call per lever
   (engine/bench_levers.py: CUDA graph, fused QKV, channels_last, each against the plain call, with how far its
   output is).
5. Prints the card, torch and CUDA versions, and ends with one JSON line holding all of it (also written to
   `--out` after every stage, with the summary so far), so a cut-off run still leaves what it measured.

`--size` and `--steps` shrink the run (a CPU check of this program, not figures).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.bench import measure_engine, prepare, timed
from engine.bench_comfy import ComfyClient, ComfyError, report, time_workflows
from engine.bench_levers import unet_levers
from engine.executor import Executor
from engine.models.cuda_graphs import UnetGraphs
from engine.nodes.vae import decode_latents
from engine.settings import EngineSettings, Limits, ModelsSettings
from engine.templates import WorkflowParams, build_workflow

__all__ = ["bench_gpu", "comfy_server", "environment", "gpu_workflows", "vae_dtypes", "vae_precision"]

SAMPLERS = (("euler", "normal"), ("dpmpp_2m", "karras"))
CFG = 7.0
START_TIMEOUT_S = 300.0
_NO_AV = "PyAV is not installed beside the ComfyUI of noodle bench gpu: its video and audio nodes need it"
# A stand-in PyAV: the names ComfyUI 0.3.64 imports at start-up (comfy_api's video types), each failing when used
AV_STUB = {
    "__init__.py": f"def __getattr__(name):\n    raise ImportError('av.' + name + ': {_NO_AV}')\n",
    "container.py": f"class InputContainer:\n    def __init__(self, *a, **k):\n        raise ImportError('{_NO_AV}')\n",
    "subtitles/__init__.py": "",
    "subtitles/stream.py": f"class SubtitleStream:\n    def __init__(self, *a, **k):\n        raise ImportError('{_NO_AV}')\n",
}


def environment() -> dict[str, Any]:
    """What the figures were measured on: the card, torch, CUDA, cuDNN, Python."""
    found: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                             "cuda": torch.version.cuda, "cudnn": None, "card": None}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(card=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                     card_memory_gib=round(properties.total_memory / 2**30, 1), driver=_driver())
    else:
        found["card"] = f"none: the CPU, {torch.get_num_threads()} threads"
    return found


def _driver() -> str | None:
    try:
        answer = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout.strip().splitlines()[0] if answer.returncode == 0 and answer.stdout.strip() else None


def gpu_workflows(family: str, checkpoint: str, size: int, steps: int) -> list[tuple[str, dict[str, Any]]]:
    """The timed txt2img graphs for one family: one per (sampler, scheduler) of SAMPLERS."""
    return [(f"{family}-{size}-{sampler}-{scheduler}", build_workflow(WorkflowParams(
        checkpoint=checkpoint, prompt="a red fox in the snow, detailed fur, golden hour", negative="blurry",
        seed=1, steps=steps, cfg=CFG, sampler_name=sampler, scheduler=scheduler, width=size, height=size,
        filename_prefix=f"bench-gpu-{family}")))
        for sampler, scheduler in SAMPLERS]


def _comfy_main(source: Path) -> Path:
    main = Path(source) / "main.py"
    if not main.is_file():
        raise ComfyError(f"{main} does not exist: --comfy-source takes a folder holding ComfyUI's source "
                         "(`make gpu-kit` puts one in .gpukit/comfyui)")
    return main


def _has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


@contextmanager
def comfy_server(source: Path, models_dir: Path, work: Path, *, port: int = 8199,
                 python: str = sys.executable) -> Iterator[str]:
    """ComfyUI from `source` serving its API on 127.0.0.1:`port` while this is open; its log is work/comfy.log."""
    main = _comfy_main(source)
    for folder in ("in", "out", "frontend"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    extra = work / "extra_model_paths.yaml"
    extra.write_text("noodle:\n" f"    base_path: {Path(models_dir).resolve()}\n"
                     + "".join(f"    {kind}: {kind}\n" for kind in ("checkpoints", "loras", "vae", "embeddings")),
                     encoding="utf-8")
    env = dict(os.environ)
    if not _has_module(python, "av"):
        stubs = work / "stubs"
        for name, text in AV_STUB.items():
            (stubs / "av" / name).parent.mkdir(parents=True, exist_ok=True)
            (stubs / "av" / name).write_text(text, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("PYTHONPATH")]))
    command = [python, str(main.resolve()), "--listen", "127.0.0.1", "--port", str(port),
               "--disable-all-custom-nodes", "--extra-model-paths-config", str(extra),
               "--input-directory", str(work / "in"), "--output-directory", str(work / "out"),
               "--front-end-root", str(work / "frontend")]
    if not torch.cuda.is_available():
        command.append("--cpu")
    log_path = work / "comfy.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=main.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(server, ComfyClient(url), log_path)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_for(server: subprocess.Popen[bytes], client: ComfyClient, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        try:
            client.reserved_bytes()
            return
        except ComfyError:
            time.sleep(1.0)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise ComfyError(f"ComfyUI did not start (exit code {server.poll()}); the end of {log_path}:\n{tail}")


def vae_dtypes(executor: Executor) -> dict[str, str]:
    """The dtype each loaded checkpoint's VAE runs in, by checkpoint: the setting says what was asked, this what
    the timed decodes ran in (a decode that fell back to float32 on NaN, as ComfyUI's rule does, shows here)."""
    return {name: str(next(executor.models.checkpoint(name).pipe.vae.parameters()).dtype).removeprefix("torch.")
            for name in executor.models.loaded_names()}


def vae_precision(vae: torch.nn.Module, side: int, repeats: int) -> dict[str, dict[str, Any]]:
    """One side x side decode by a copy of `vae` in each precision, after a warm-up: median milliseconds, the
    peak memory of the decode on a GPU, and whether a half-precision copy gave NaN and went to float32 (the
    retry decode_latents makes)."""
    cuda = vae.device.type == "cuda"
    latent = torch.randn(1, vae.config.latent_channels, side // 8, side // 8,
                         generator=torch.Generator().manual_seed(0))
    found: dict[str, dict[str, Any]] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        module = copy.deepcopy(vae).to(dtype)
        seconds = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                seconds.append(timed(partial(decode_latents, module, latent)))
        found[str(dtype).removeprefix("torch.")] = {
            "ms": round(statistics.median(seconds[1:]) * 1000, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "went_float32": dtype != torch.float32 and module.dtype == torch.float32}
        del module
        if cuda:
            torch.cuda.empty_cache()
    return found


def bench_gpu(comfy_source: Path, models_dir: Path, *, repeats: int = 3, families: Sequence[str] = ("sd15", "sdxl"),
              size: int | None = None, steps: int | None = None, out: Path | None = None, port: int = 8199,
              engine: EngineSettings | None = None, limits: Limits | None = None) -> int:
    """Run steps 1-5 of the module's docstring; return the exit code."""
    from engine.executor import create_executor

    _comfy_main(comfy_source)  # said before minutes go into writing checkpoints
    found: dict[str, Any] = {"environment": environment()}
    print("measured on: " + ", ".join(f"{key} {value}" for key, value in found["environment"].items()), flush=True)

    def keep() -> None:  # after every stage: what is measured so far survives a cut-off run
        found["summary"] = summary(found)
        if out is not None:
            Path(out).write_text(json.dumps(found, indent=1), encoding="utf-8")

    keep()
    cases = {family: prepare(models_dir, family) for family in families}
    workflows = [workflow for family, case in cases.items()
                 for workflow in gpu_workflows(family, case.checkpoint, size or case.size, steps or case.steps)]
    work = Path(tempfile.mkdtemp(prefix="noodle-bench-gpu-"))
    settings = (engine or EngineSettings()).model_copy(update={"output_dir": work / "noodle-out"})
    executor = create_executor(ModelsSettings(dir=models_dir), settings, limits or Limits())
    with comfy_server(comfy_source, models_dir, work, port=port) as url:
        found["comfy"] = report(executor, time_workflows(ComfyClient(url), executor, workflows, repeats))
        keep()
        if executor.device.type == "cuda" and executor.models.graphs is None:
            print("again with [engine] cuda_graphs = true:", flush=True)
            executor.models.graphs = UnetGraphs()
            try:
                found["comfy_cuda_graphs"] = report(executor, time_workflows(ComfyClient(url), executor, workflows,
                                                                             repeats))
            except Exception as err:  # a lever's failure is a finding, not the end of the figures the issue asks
                found["comfy_cuda_graphs"] = {"error": f"{type(err).__name__}: {err}"}
                print(f"with cuda_graphs the run failed: {type(err).__name__}: {err}", flush=True)
            executor.models.graphs.clear()
            executor.models.graphs = None
    keep()
    found["noodle_vae_dtype"] = str(executor.models.vae_dtype).removeprefix("torch.")  # the setting, resolved
    found["noodle_vae_module_dtypes"] = vae_dtypes(executor)
    # what point 3 of the speed issue asks comes first, so a run cut off at its time limit still holds it
    executor.models.unload_all()  # its models reload for the stages below; diffusers' pipeline gets the room
    if "sdxl" in families:
        print("Noodle's graph against diffusers' pipeline, SDXL at full size:", flush=True)
        found["sdxl_vs_diffusers"] = measure_engine(models_dir, repeats, real_size="sdxl")
        keep()
    stages = (("vae_precision", "VAE, one {side}x{side} decode per precision", lambda pipe, side:
               vae_precision(pipe.vae, side, repeats)),
              ("unet_levers", "UNet, one call per lever at {side}x{side}", lambda pipe, side:
               unet_levers(pipe.unet, side, repeats)))
    for stage, title, measure in stages:
        found[stage] = {}
        for family, case in cases.items():
            side = size or case.size
            print(f"{family} {title.format(side=side)}:", flush=True)
            found[stage][family] = measure(executor.models.checkpoint(case.checkpoint).pipe, side)
            print(json.dumps(found[stage][family]), flush=True)
            keep()
    print(json.dumps(found))
    return 0


def summary(found: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of what `bench_gpu` has measured so far."""
    environment = found["environment"]
    return {"card": environment["card"], "torch": environment["torch"], "cuda": environment["cuda"],
            "vs_comfy": found.get("comfy", {}).get("vs_comfy"),
            "vs_comfy_cuda_graphs": found.get("comfy_cuda_graphs", {}).get("vs_comfy"),
            "sdxl_graph_vs_pipeline": found.get("sdxl_vs_diffusers", {}).get("graph_vs_pipeline"),
            "unet_levers_vs_plain": {family: {lever: times.get("vs_plain") for lever, times in levers.items()
                                              if lever != "plain"}
                                     for family, levers in found.get("unet_levers", {}).items()},
            "vae_bfloat16_vs_float32": {family: round(times["bfloat16"]["ms"] / times["float32"]["ms"], 3)
                                        for family, times in found.get("vae_precision", {}).items()}}

