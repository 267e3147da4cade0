"""What a workflow will cost, computed from the graph before it runs, and refused past config.toml's [limits].

Validation (engine/validate.py) checks each node's own inputs: an EmptyLatentImage of batch 8 passes, and so
does a RepeatLatentBatch of 4 after it, though the sampler then gets 32 latents. Here the shapes are followed
through a validated prompt in run order, from its constants, as the nodes will make them: for each LATENT and
IMAGE value its batch and size in pixels, for each CONDITIONING its items and their token lengths; and the
job's sampler steps and the images its output nodes write are summed. Nothing runs: LoadImage's file gives
its size from its header, an upscale model's its scale from its tensor shapes, a CLIPTextEncode's text its
chunk count from the shipped tokenizer (prompts.plan, the count its encode will have).

Each value is held to max_batch, max_side, max_pixels, max_conditioning_items and max_conditioning_tokens at
the node that makes it; a sampler's text context (its items repeated to one length) to max_conditioning_tokens;
the job to max_job_steps and max_job_images at the node that crosses them. A refusal is ComfyUI's error body
(`WorkflowInvalid`, error type `limit_exceeded`) naming each such node, so /workflow shows one line per node.
A value over a limit is not followed further: its node is the one to fix, and what it feeds would repeat it.

`validate_within_limits` is what the executor calls: the node count first, before any node is checked, then
`engine.validate.validate`, then `check_cost`.

The package: shapes.py (the shapes followed and `Step`, one node's view while its rule runs), files.py (what is
read beside the graph: image headers, upscaler scales, prompt chunks), rules.py (`RULES`: one rule per node,
how it makes its outputs' shapes), check.py (`check_cost`, `validate_within_limits`, the refusal body).
"""

from __future__ import annotations

from engine.cost.check import WorkflowCost, check_cost, validate_within_limits
from engine.cost.files import ModelFiles
from engine.cost.rules import RULES
from engine.cost.shapes import LIMIT_EXCEEDED, Cond, Pictures, Shape, Upscaler

__all__ = ["LIMIT_EXCEEDED", "RULES", "Cond", "ModelFiles", "Pictures", "Shape", "Upscaler", "WorkflowCost",
           "check_cost", "validate_within_limits"]
