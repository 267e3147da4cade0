"""Cost rule of unCLIPConditioning (engine/nodes/clip_vision.py): the same conds, each with an image embedding
added, which changes neither their count nor their token length (the embedding joins the pooled vector).

CLIPVisionEncode makes no shape the limits measure (its image is held where it was loaded or made).
Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports it.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import Shape, Step


@_rule("unCLIPConditioning")
def _unclip_conditioning(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.cond("conditioning"),)
