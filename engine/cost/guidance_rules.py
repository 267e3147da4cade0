"""Cost rule of DualCFGGuider (engine/nodes/dual_cfg.py): the item lengths of the conds its model calls take, so
SamplerCustomAdvanced holds its text context to the limit as it does a CFGGuider's.

The MODEL patch nodes (RescaleCFG, PerturbedAttentionGuidance, SelfAttentionGuidance) make no shape: a MODEL is
not followed, and the cost check counts steps, not UNet passes (PAG and SAG add one pass of one cond a step).
Registered into `RULES` (engine/cost/rules.py) on import; engine/cost/check.py imports it.
"""

from __future__ import annotations

import math

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import GuiderConds, Shape, Step


@_rule("DualCFGGuider")
def _dual_cfg_guider(step: Step, files: Files) -> tuple[Shape, ...]:
    # "regular" skips the negative at cfg_cond2_negative 1, and cond2 too when cfg_conds is 1 as well
    regular = step.const("style") != "nested"
    skip_negative = regular and math.isclose(step.const("cfg_cond2_negative"), 1.0)
    skip_middle = skip_negative and math.isclose(step.const("cfg_conds"), 1.0)
    lengths: set[int] = set()
    for name, skipped in (("cond1", False), ("cond2", skip_middle), ("negative", skip_negative)):
        cond = step.cond(name)
        if cond is not None and not skipped:
            lengths |= cond.lengths
    return (GuiderConds(frozenset(lengths)),)
