"""Engine settings: the `[models]`, `[engine]` and `[limits]` tables of config.toml.

The front end's `Settings` (bot/settings.py) reads the file and hands these down; the engine
never reads configuration on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class ModelsSettings(BaseModel):
    """Where models live: `checkpoints/`, `loras/`, `vae/`, `embeddings/` under `dir`."""

    dir: Path = Path("models")
    # Pickle files run code on load; only with this on are .ckpt/.pt/.bin loaded, and then
    # with torch.load(weights_only=True), as ComfyUI does.
    allow_weights_only_pickle: bool = False
    # A1111's short model hashes (sha256 of whole files: seconds for a big checkpoint), kept across restarts;
    # None keeps them in memory only.
    hash_cache: Path | None = Path(".cache/model-hashes.json")


class EngineSettings(BaseModel):
    """Device, precision and cache sizes."""

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # the VAE's: "auto" is ComfyUI's choice, bfloat16 on GPUs that run it at full speed (NVIDIA Ampere and newer,
    # Apple silicon on macOS 14+), float32 elsewhere and whenever dtype is float32 (engine/device.py)
    vae_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    output_dir: Path = Path("output")
    input_dir: Path = Path("input")
    # Node outputs kept between runs, most recently used first (ComfyUI keeps the last prompt's).
    node_cache_entries: int = Field(256, ge=0)
    # ...and bytes of their tensors (latents, images, conditioning; models count in model_memory_bytes):
    # least recently used first out past it. 0 means automatic: an eighth of the automatic model budget,
    # at most 2 GiB (a 1024x1024 batch of 8 images is 100 MB, its latents 2 MB).
    node_cache_bytes: int = Field(0, ge=0)
    # Loaded checkpoints kept; 0 bytes means automatic (engine.device.memory_budget: VRAM less room for
    # activations on CUDA, half the usable RAM, container limits included, elsewhere).
    model_memory_bytes: int = Field(0, ge=0)
    prompt_weighting: Literal["comfy", "a1111"] = "comfy"
    # how prompt text is read (prompts/plan.py): "noodle", A1111's emphasis ((x:1.2) inside ( multiplies, [x] /1.1,
    # BREAK), <lora:> tags and whole words per 75-token chunk; "comfy", exactly as ComfyUI's CLIPTextEncode reads it
    # (flat (x:1.2), [x] and BREAK plain text, chunks cut at 75 tokens inside a word), for the same pictures as
    # ComfyUI from the same workflows. The bot's <lora:> tags become LoraLoaders in both
    prompt_syntax: Literal["noodle", "comfy"] = "noodle"
    # "local": one worker thread in this process runs every job on this machine's device; "ray": engine workers
    # on a Ray cluster, one per device ([ray] below, engine/cluster/), the queue staying in this process
    workers: Literal["local", "ray"] = "local"
    # torch.compile the UNet (engine/models/compiled.py): faster sampling once compiled, results equal to eager up
    # to the last float bits. Each new latent size or batch size compiles once per process (a minute or more on a
    # CPU, less on a GPU); a new seed or prompt never does. Runs with LoRAs or UNet patches stay eager.
    compile: bool = False
    # inductor's caches (kernels, FX graphs): kept between restarts, so a restart only retraces
    compile_cache: Path = Path(".cache/torch-compile")
    # on a CUDA device, replay the UNet's call as a CUDA graph (engine/models/cuda_graphs.py): one launch for its
    # ~1,200 operations, the same kernels as eager; each image size and prompt length is captured once (about three
    # calls) and kept (up to 8, in one shared pool of activations). Runs with LoRAs or UNet patches stay eager
    cuda_graphs: bool = False
    # on the CPU, keep freed tensor memory in the process for the next sampler step instead of page-faulting it
    # back in from the kernel (engine/heap.py; glibc only): the same pixels, a full-size SD1.5 job 17% faster at
    # 256x256 on this machine, for 0.6-1.4 GB more peak memory at 512x512 (given back when the queue is quiet for
    # half a minute or a model is unloaded)
    reuse_cpu_memory: bool = True


class Limits(BaseModel):
    """What one workflow may ask of this machine; tighter than ComfyUI's own ranges."""

    max_side: int = Field(2048, ge=64)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_batch: int = Field(8, ge=1)
    max_steps: int = Field(150, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    # Each 75-token chunk costs a text-encoder pass and longer cross-attention; beyond this many
    # the rest of a prompt is cut, and the token report says how many tokens were.
    max_prompt_chunks: int = Field(8, ge=1)
    max_input_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # An uploaded workflow JSON (/workflow); ComfyUI's exports of ordinary graphs are a few KiB to tens of KiB.
    max_workflow_bytes: int = Field(256 * 1024, ge=1024)
    # The whole graph's cost, computed before a workflow is queued (engine/cost/); max_batch, max_side and
    # max_pixels above also hold for every latent and image after every node, not only where a node sets them.
    # Nodes in one workflow: a graph for one picture has tens; validating costs a little per node.
    max_workflow_nodes: int = Field(500, ge=1)
    # Items of one conditioning (ConditioningCombine adds them up): each item is one more UNet pass per latent
    # per step, so 16 items cost 16 pictures' worth of sampling.
    max_conditioning_items: int = Field(16, ge=1)
    # Tokens of the text context a sampler attends to: ConditioningConcat adds lengths, and a sampler repeats
    # items of different lengths to their least common multiple, as ComfyUI does. 4312 = 77 x lcm(7, 8): the
    # longest a prompt and a negative within max_prompt_chunks = 8 chunks repeat to, so every /imagine runs.
    max_conditioning_tokens: int = Field(77 * 7 * 8, ge=77)
    # Sampler steps of one job, all samplers together: a hires-fix graph runs two or three samplers.
    max_job_steps: int = Field(1000, ge=1)
    # Images one job writes (SaveImage and PreviewImage together); Discord posts 10 files a message.
    max_job_images: int = Field(32, ge=1)
    # MiB every write (SaveImage, PreviewImage, uploads) leaves free on its disk, or it is refused with a message:
    # the SQLite file beside them needs room to record the job, and a full disk fails more than one job.
    min_free_disk_mb: int = Field(512, ge=0)
    # Input pixels of one tile an upscale model (ImageUpscaleWithModel) works on at a time: its memory on the
    # device is this tile's activations plus the model, whatever the picture's size. 512x512 is ComfyUI's tile;
    # a 4x ESRGAN (23 blocks, 64 features) needs about 3.8 GB at fp32 for it (measured: 14.6 KB per tile pixel),
    # a 256x256 tile a quarter. Halved on out-of-memory down to 128x128, as ComfyUI does.
    upscale_tile_pixels: int = Field(512 * 512, ge=128 * 128)
    # VAE calls one VAEDecodeTiled / VAEEncodeTiled may make (its three passes, every picture): tiny tiles over a
    # big batch are thousands of calls. The defaults' tiles on eight 2048x2048 pictures are about 730.
    max_vae_tiles: int = Field(2048, ge=16)


class QueueSettings(BaseModel):
    """The `[queue]` table: how many jobs wait, how many run as one batch, what a crash costs a job."""

    # Jobs one user may have queued or running at once; more are refused with the list of theirs.
    per_user_max: int = Field(5, ge=1)
    # Jobs queued or running in total.
    global_max: int = Field(100, ge=1)
    # Queued jobs that differ only in seeds and prompts run as one sampler batch of up to this many.
    batch_max: int = Field(4, ge=1)
    # A job that was running when the process died is run once more after a restart, then failed.
    retry_running_once: bool = True
    # Seconds one job may run (from its start, not its wait in the queue); past it, it is stopped at its
    # next sampler step or node and fails with a message. 0: no limit. Fractions allowed.
    job_time_limit_seconds: float = Field(600.0, ge=0)


class RaySettings(BaseModel):
    """The `[ray]` table: engine workers on a Ray cluster, used when `[engine] workers = "ray"` (engine/cluster/)."""

    # "local": Noodle starts a Ray cluster on this machine with `workers` workers; "auto": the cluster that
    # `ray start --head` runs on this machine; "ray://host:10001": a remote cluster's client port
    address: str = "local"
    # Workers Noodle starts: 0 is one per GPU of the cluster (one CPU worker where it has none). Machines that
    # run `noodle worker --address ...` add their own on top.
    workers: int = Field(0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)  # on a cluster with GPUs; 0 runs CPU workers there too
    # "bytes": a worker sends its result files back and gets the input images it needs sent; "shared":
    # [engine] output_dir and input_dir are one folder every worker sees at the same path
    files: Literal["bytes", "shared"] = "bytes"
    # Times a queued job may be passed over (a later job starts first because a free worker holds its models);
    # then it takes the next free worker and loads what it needs. 0: the fair order, routed among free workers.
    routing_patience: int = Field(4, ge=0)
    # "models": to the worker holding a job's models; "round_robin": in turn, whatever they hold (for the bench)
    routing: Literal["models", "round_robin"] = "models"
    # Ray's namespace: `noodle worker` registers its worker under it, the bot looks for them there
    namespace: str = "noodle"
    join_poll_seconds: float = Field(5.0, gt=0)  # how often the bot looks for workers `noodle worker` started
