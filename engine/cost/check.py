"""The whole-graph cost check: the shapes followed through a validated prompt in run order, each held to
config.toml's [limits] at the node that makes it, the job's steps and images summed, a refusal as ComfyUI's
error body. engine/cost/__init__.py says what is measured and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import engine.cost.area_rules  # noqa: F401  (registers the area conditioning nodes' rules in RULES)
import engine.cost.clip_vision_rules  # noqa: F401  (unCLIPConditioning's rule)
import engine.cost.gligen_rules  # noqa: F401  (GLIGENTextBoxApply's rule)
import engine.cost.guidance_rules  # noqa: F401  (DualCFGGuider's rule)
import engine.cost.mask_rules  # noqa: F401  (the MASK nodes' rules)
import engine.cost.op_rules  # noqa: F401  (registers the small nodes' rules in RULES)
import engine.cost.sigma_rules  # noqa: F401  (the SIGMAS nodes' and SaveImageWebsocket's rules)
import engine.cost.tiled_rules  # noqa: F401  (VAEDecodeTiled's and VAEEncodeTiled's rules)
from engine.cost.files import Files, ModelFiles
from engine.cost.rules import RULES
from engine.cost.shapes import LIMIT_EXCEEDED, Cond, Pictures, Shape, Step
from engine.errors import WorkflowInvalid
from engine.graph import Workflow, upstream
from engine.nodes.base import Node
from engine.settings import Limits
from engine.validate import ValidatedPrompt, validate
from prompts.plan import Syntax

__all__ = ["WorkflowCost", "check_cost", "validate_within_limits"]


@dataclass(frozen=True)
class WorkflowCost:
    """What a workflow will ask of the machine, in the measures config.toml limits."""

    nodes: int  # nodes that run
    steps: int  # sampler steps, all samplers together
    images: int  # images SaveImage and PreviewImage write
    batch: int  # the largest latent or image batch
    side: int  # the longest side of any latent (in pixels) or image
    pixels: int  # the largest width x height of any latent or image
    conditioning_items: int  # the most items of one conditioning
    conditioning_tokens: int  # the longest text context: one item, or a sampler's items repeated to one length


def check_cost(prompt: ValidatedPrompt, limits: Limits, models: ModelFiles,
               registry: Mapping[str, type[Node]], *, syntax: Syntax = "noodle") -> WorkflowCost:
    """The cost of a validated prompt, its texts read in `syntax` ([engine] prompt_syntax); raises WorkflowInvalid
    naming each node past a limit."""
    files = Files(models, limits, syntax)
    shapes: dict[str, tuple[Shape, ...]] = {}
    refused: dict[str, list[dict[str, Any]]] = {}
    totals = {"steps": 0, "images": 0}
    context = 0
    for node_id in prompt.order:
        class_type = str(prompt.workflow.nodes[node_id].class_type)
        inputs = {name: shapes[src][index] if index < len(shapes[src]) else None
                  for name, (src, index) in prompt.links.get(node_id, {}).items()}
        step = Step(registry[class_type], prompt.constants.get(node_id, {}), inputs, limits)
        rule = RULES.get(class_type)
        shapes[node_id] = tuple(_held(step, shape) for shape in (rule(step, files) if rule else ()))
        _add_to_job(step, totals)
        context = max(context, step.context)
        if step.errors:
            refused[node_id] = step.errors
    if refused:
        raise WorkflowInvalid(_body(prompt, refused))
    made = [shape for outputs in shapes.values() for shape in outputs]
    pictures = [s for s in made if isinstance(s, Pictures)]
    conds = [s for s in made if isinstance(s, Cond)]
    return WorkflowCost(
        nodes=len(prompt.order), steps=totals["steps"], images=totals["images"],
        batch=max((p.batch for p in pictures), default=0),
        side=max((max(p.width, p.height) for p in pictures), default=0),
        pixels=max((p.width * p.height for p in pictures), default=0),
        conditioning_items=max((c.items for c in conds), default=0),
        conditioning_tokens=max([context, *(max(c.lengths) for c in conds)]))


def validate_within_limits(workflow: object, registry: Mapping[str, type[Node]], models: ModelFiles,
                           limits: Limits, *, syntax: Syntax = "noodle") -> ValidatedPrompt:
    """Validate as ComfyUI does, bounded: the node count before any node is checked, the whole cost after."""
    parsed = Workflow.parse(workflow)
    if len(parsed.nodes) > limits.max_workflow_nodes:
        message = (f"the workflow has {len(parsed.nodes):,} nodes; this server's limit is "
                   f"{limits.max_workflow_nodes:,} (limits.max_workflow_nodes in config.toml): a graph for one "
                   "picture has tens, so split it into several workflows")
        raise WorkflowInvalid({"error": {"type": LIMIT_EXCEEDED, "message": message, "details": "",
                                         "extra_info": {"limit": "max_workflow_nodes"}}, "node_errors": {}})
    prompt = validate(parsed, registry, models.choices, limits)
    check_cost(prompt, limits, models, registry, syntax=syntax)
    return prompt


def _held(step: Step, shape: Shape) -> Shape:
    """`shape`, or None once it is over a limit (the refusal added to the node's)."""
    before, limits = len(step.errors), step.limits
    if isinstance(shape, Pictures):
        noun = {"LATENT": "latents", "MASK": "masks"}.get(shape.kind, "images")
        size = f"{shape.width:,}x{shape.height:,}"
        smallest = 8 if shape.kind == "LATENT" else 1  # a latent's cell is 8 pixels
        if min(shape.width, shape.height) < smallest:  # a resize by a tiny factor: torch fails on it, raw
            step.refuse_empty(f"makes {noun} of {size} pixels; {noun} need at least {smallest}x{smallest}",
                              "use a larger size or scale factor")
        if shape.batch > limits.max_batch:
            step.refuse("max_batch", shape.batch, f"makes a batch of {shape.batch:,} {noun}", "make fewer at once")
        if max(shape.width, shape.height) > limits.max_side:
            step.refuse("max_side", max(shape.width, shape.height), f"makes {noun} of {size} pixels",
                        "choose a smaller size (a side given as 0 follows the input's aspect ratio)", per=" a side")
        elif shape.width * shape.height > limits.max_pixels:
            step.refuse("max_pixels", shape.width * shape.height,
                        f"makes {noun} of {size} = {shape.width * shape.height:,} pixels", "choose a smaller size")
    elif isinstance(shape, Cond):
        if shape.items > limits.max_conditioning_items:
            step.refuse("max_conditioning_items", shape.items,
                        f"makes a conditioning of {shape.items:,} items (ConditioningCombine adds its inputs' items, "
                        "and each is one more UNet pass per latent per step)", "combine fewer")
        if max(shape.lengths) > limits.max_conditioning_tokens:
            step.refuse("max_conditioning_tokens", max(shape.lengths),
                        f"makes a conditioning of {max(shape.lengths):,} tokens (ConditioningConcat adds its inputs' "
                        "lengths)", "concatenate fewer or shorter prompts")
    return shape if len(step.errors) == before else None


def _add_to_job(step: Step, totals: dict[str, int]) -> None:
    """Add a node's steps and images to the job's; the node that first crosses a job limit is named."""
    for key, added, what, fix in (("steps", step.steps, "the job's sampler steps", "use fewer samplers or steps"),
                                  ("images", step.writes, "the images the job writes",
                                   "save fewer images, or smaller batches")):
        limit = f"max_job_{key}"
        before, totals[key] = totals[key], totals[key] + added
        if before <= getattr(step.limits, limit) < totals[key]:
            step.refuse(limit, totals[key], f"brings {what} to {totals[key]:,} ({added:,} here)", fix, key, " a job")


def _body(prompt: ValidatedPrompt, refused: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """ComfyUI's error body: each refused node with the outputs that need it."""
    reach = {out: upstream(prompt.workflow, [out]) for out in prompt.outputs}
    node_errors = {node_id: {"errors": errors, "dependent_outputs": [out for out in prompt.outputs
                                                                     if node_id in reach[out]],
                             "class_type": str(prompt.workflow.nodes[node_id].class_type)}
                   for node_id, errors in refused.items()}
    if any(error["type"] == LIMIT_EXCEEDED for errors in refused.values() for error in errors):
        top = {"type": LIMIT_EXCEEDED, "message": "Workflow is over this server's limits"}
    else:  # only shapes too small to compute on (Step.refuse_empty)
        top = {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"}
    return {"error": {**top, "details": "", "extra_info": {}}, "node_errors": node_errors}
