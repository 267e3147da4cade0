"""Cost rules of the area conditioning nodes (engine/nodes/area_conditioning.py): they keep their conds' items and
lengths, so a sampler's text context and UNet passes are counted as before.

An area costs no more than its latent: the sampler cuts it to the latent (as ComfyUI's get_area_and_mult), and a
cond sees only that crop. An area cond may add one twin on the other side (ComfyUI's
create_cond_with_same_area_if_none), so a sampler's passes per step stay within twice its conds' items, each held
to max_conditioning_items. A ConditioningSetArea side past max_side fits no latent this server makes: it is refused
here rather than cut at every step.

Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports both.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import Shape, Step


@_rule("ConditioningSetArea")
def _set_area(step: Step, files: Files) -> tuple[Shape, ...]:
    width, height = int(step.const("width")), int(step.const("height"))
    side = max(width, height)
    if side > step.limits.max_side:
        step.refuse("max_side", side, f"sets an area of {width:,}x{height:,} pixels, larger than any picture this "
                    "server samples", "make the area no bigger than the picture (the sampler cuts it to the "
                    "picture anyway)", "width" if width >= height else "height", per=" a side")
    return (step.cond("conditioning"),)


@_rule("ConditioningSetAreaPercentage", "ConditioningSetAreaStrength", "ConditioningSetMask")
def _same_conds(step: Step, files: Files) -> tuple[Shape, ...]:
    # fractions of the latent, a weight, a mask resized to the latent: the same conds, never bigger than the latent
    return (step.cond("conditioning"),)
