"""`make run` before the bot exists: one txt2img on the models folder (the tiny models if there is none)."""

from __future__ import annotations

import json
from pathlib import Path

from bot.settings import Settings
from engine.runtime import create_executor
from engine.templates import WorkflowParams, build_workflow

TINY_DIR = Path(".cache/models")


def run_demo(settings: Settings) -> int:
    """Generate one image and print where it is, with its seed and token usage."""
    models = settings.models
    if not (models.dir / "checkpoints").is_dir():
        from engine.tiny import write_tiny_models

        write_tiny_models(TINY_DIR)
        models = models.model_copy(update={"dir": TINY_DIR})
        print(f"no models folder at {settings.models.dir}/checkpoints: using the tiny test models in {TINY_DIR}")
    executor = create_executor(models, settings.engine, settings.limits)
    checkpoints = executor.models.choices("checkpoints")
    if not checkpoints:
        print(f"{models.dir}/checkpoints holds no .safetensors file: drop an SD1.5 or SDXL checkpoint there")
        return 1
    checkpoint = "tiny-sd15.safetensors" if "tiny-sd15.safetensors" in checkpoints else checkpoints[0]
    tiny = checkpoint.startswith("tiny-")
    params = WorkflowParams(checkpoint=checkpoint, prompt="a red fox in the snow, (highly detailed:1.2)",
                            negative="blurry", seed=42, steps=8 if tiny else 20, cfg=7.0,
                            width=64 if tiny else 512, height=64 if tiny else 512, filename_prefix="noodle-demo")
    result = executor.run(build_workflow(params))
    for image in result.outputs["9"]["images"]:
        path = settings.engine.output_dir / image["subfolder"] / image["filename"]
        print(f"wrote {path.resolve()}")
    meta = result.meta
    print(f"checkpoint {params.checkpoint}, seed {meta['seeds']['3']}, {params.steps} steps, "
          f"{meta['timings']['total']:.2f} s")
    print("tokens:", json.dumps({k: v["tokens"] for k, v in meta["tokens"].items()}))
    return 0
