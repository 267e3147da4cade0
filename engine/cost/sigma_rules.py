"""Cost rules of the SIGMAS nodes in engine/nodes/sigma_nodes.py, and of SaveImageWebsocket: each schedule's
length as its node will make it, so a sampler along it counts its steps toward max_steps and max_job_steps.

ExtendIntermediateSigmas multiplies a schedule's length, and which pairs it extends depends on the sigmas'
values, which the graph does not give: its length is bounded by every pair extended and held to max_steps at the
node itself, before its sampler sees it. Registered into `RULES` (engine/cost/rules.py) on import;
engine/cost/check.py imports this module.
"""

from __future__ import annotations

from engine.cost.files import Files
from engine.cost.rules import _rule, _save, _sigma_count
from engine.cost.shapes import Shape, SigmaCount, Step

_rule("SaveImageWebsocket")(_save)  # writes its images as PreviewImage does


@_rule("AlignYourStepsScheduler", "GITSScheduler", "OptimalStepsScheduler")
def _table_schedule(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.sigma_nodes import table_steps

    kept = table_steps(int(step.const("steps")), float(step.const("denoise")))
    return (SigmaCount(0 if kept is None else kept + 1),)


@_rule("LaplaceScheduler")
def _laplace(step: Step, files: Files) -> tuple[Shape, ...]:
    return (SigmaCount(int(step.const("steps"))),)  # ends at sigma_min: no 0 appended


@_rule("VPScheduler", "BetaSamplingScheduler")
def _steps_and_zero(step: Step, files: Files) -> tuple[Shape, ...]:
    # BetaSamplingScheduler drops a timestep rounding repeats: steps + 1 is its most
    return (SigmaCount(int(step.const("steps")) + 1),)


@_rule("SplitSigmasDenoise")
def _split_by_denoise(step: Step, files: Files) -> tuple[Shape, ...]:
    sigmas = _sigma_count(step)
    if sigmas is None:
        return (None, None)
    kept = round(max(sigmas.length - 1, 0) * float(step.const("denoise")))
    return SigmaCount(sigmas.length - kept if kept else 0), SigmaCount(min(kept + 1, sigmas.length))


@_rule("SetFirstSigma")
def _same_length(step: Step, files: Files) -> tuple[Shape, ...]:
    return (_sigma_count(step),)


@_rule("ExtendIntermediateSigmas")
def _extend(step: Step, files: Files) -> tuple[Shape, ...]:
    from engine.nodes.sigma_nodes import extended_length_bound

    sigmas = _sigma_count(step)
    if sigmas is None:
        return (None,)
    steps = int(step.const("steps"))
    bound = extended_length_bound(sigmas.length, steps, float(step.const("start_at_sigma")),
                                  float(step.const("end_at_sigma")))
    if bound - 1 > step.limits.max_steps:
        step.refuse("max_steps", bound - 1,
                    f"may make {bound:,} sigmas, {bound - 1:,} steps ({steps - 1:,} more between each pair of its "
                    f"{sigmas.length:,} sigmas within its window)",
                    "extend fewer steps, narrow start_at_sigma..end_at_sigma, or start from a shorter schedule",
                    "steps")
        return (None,)
    return (SigmaCount(bound),)
