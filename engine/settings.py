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
    output_dir: Path = Path("output")
    input_dir: Path = Path("input")
    # Node outputs kept between runs, most recently used first (ComfyUI keeps the last prompt's).
    node_cache_entries: int = Field(256, ge=0)
    # Loaded checkpoints kept; 0 bytes means automatic (engine.device.memory_budget: VRAM less room for
    # activations on CUDA, half the usable RAM, container limits included, elsewhere).
    model_memory_bytes: int = Field(0, ge=0)
    prompt_weighting: Literal["comfy", "a1111"] = "comfy"


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
