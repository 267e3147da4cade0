"""Cost rule of GLIGENTextBoxApply (engine/nodes/gligen.py): the same conds, each with one more text box, which
changes neither their count nor their token length (the box's text becomes one pooled vector).

GLIGENLoader makes no shape the limits measure. Registered into `RULES` (engine/cost/rules.py) on import;
engine/cost/check.py imports it.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule
from engine.cost.shapes import Shape, Step


@_rule("GLIGENTextBoxApply")
def _gligen_text_box(step: Step, files: Files) -> tuple[Shape, ...]:
    return (step.cond("conditioning_to"),)
