"""What a queued ticket says in one line: `tiny-sd15 · 64×64 ×2 · seeds 42-43` for /imagine (with `· inpaint`,
`· ControlNet NAME 1` where they apply),
`portrait.json · tiny-sd15 · seed 42` for /workflow."""

from __future__ import annotations

from engine.models.paths import display_name
from engine.templates import WorkflowParams

__all__ = ["summary_of", "workflow_summary"]


def summary_of(params: WorkflowParams, count: int = 1) -> str:
    """`tiny-sd15 · 64×64 ×2 · seeds 42-43`: what a queued ticket says."""
    model = display_name(params.checkpoint)
    batch = f" ×{count}" if count > 1 else ""
    kind = (" · inpaint" if params.inpaint else " · img2img") if params.init_image else ""
    if params.is_upscale:
        kind = f" · upscale {params.upscale_by:g}×, hires fix {params.denoise:g}"
    elif params.is_outpaint:
        kind = " · outpaint"
    if params.controlnet:
        kind += f" · ControlNet {display_name(params.controlnet)} {params.control_strength:g}"
    seeds = f"seeds {params.seed}-{params.seed + count - 1}" if count > 1 else f"seed {params.seed}"
    return f"{model} · {params.width}×{params.height}{batch}{kind} · {seeds}"


def workflow_summary(filename: str, checkpoints: list[str], seeds: dict[str, int]) -> str:
    """`portrait.json · tiny-sd15 · seed 42`: what a queued workflow's ticket says."""
    models = ", ".join(display_name(name) for name in checkpoints) or "no checkpoint"
    if len(seeds) == 1:
        shown = f"seed {next(iter(seeds.values()))}"
    else:
        shown = "seeds " + ", ".join(f"node {node_id}: {seed}" for node_id, seed in seeds.items()) if seeds \
            else "no sampler seed"
    return f"{filename} · {models} · {shown}"
