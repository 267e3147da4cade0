"""DualCFGGuider against ComfyUI 0.3.64's Guider_DualCFG.predict_noise written out here (comfy_extras/
nodes_custom_sampler.py, with comfy/samplers.py cfg_function): both styles, the passes "regular" skips at cfg 1,
the MODEL's hooks inside it, what a cfg_pp sampler reads as its uncond; its cost rule; and graphs on the tiny SD1.5
model through SamplerCustomAdvanced."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from engine.executor import Executor
from engine.nodes import catalog
from engine.nodes.guidance import guided_eps
from engine.nodes.guidance_patches import RescaleCfgFunction
from engine.cost.check import validate_within_limits
from engine.settings import Limits
from engine.values import DualCFG, ModelPatches
from tests.engine.conftest import txt2img
from tests.engine.nodes.test_custom_sampling import advanced, pixels_of, refused
from tests.engine.nodes.test_guidance_patches import (AffineUNet, call, comfy_rescale, cond, denoised, k_x,
                                                      latents, plain_eps)

POSITIVE, MIDDLE, NEGATIVE = 0.8, 0.3, -0.4  # the fake UNet tells the conds apart by these context means


def comfy_dual(pos: torch.Tensor, middle: torch.Tensor, neg: torch.Tensor, cfg1: float, cfg2: float, nested: bool,
               cfg_function: Any = None) -> torch.Tensor:
    """Guider_DualCFG.predict_noise on the three denoised estimates (a skipped cond's is 0, passed so here)."""
    combine = cfg_function or (lambda c, u, scale: u + (c - u) * scale)
    if nested:
        pred_text = combine(pos, middle, cfg1)
        return neg + cfg2 * (pred_text - neg)
    return combine(middle, neg, cfg2) + (pos - middle) * cfg1


def dual_guided(unet: torch.nn.Module, cfg1: float, cfg2: float, nested: bool,
                patches: ModelPatches | None = None) -> Any:
    return guided_eps(unet, cond(1, POSITIVE), cond(3, NEGATIVE), cfg1, False, (64, 64), patches=patches,
                      dual=DualCFG(cond(2, MIDDLE), cfg2, nested))


def estimates(unet: torch.nn.Module, scaled: torch.Tensor) -> list[torch.Tensor]:
    return [denoised(plain_eps(unet, cond(0, value), scaled), scaled) for value in (POSITIVE, MIDDLE, NEGATIVE)]


@pytest.mark.parametrize("nested", [False, True], ids=["regular", "nested"])
@pytest.mark.parametrize(("cfg1", "cfg2"), [(8.0, 8.0), (3.0, 1.0), (1.0, 1.0), (1.0, 5.0), (0.0, 2.5)])
def test_dual_cfg_is_comfyuis_and_regular_skips_the_passes_it_skips(nested: bool, cfg1: float, cfg2: float) -> None:
    unet, scaled = AffineUNet(), latents()
    got = denoised(call(dual_guided(unet, cfg1, cfg2, nested), scaled), scaled)
    rows = [value for values in unet.calls for value in values]
    pos, middle, neg = estimates(unet, scaled)
    skip_negative = not nested and cfg2 == 1.0
    skip_middle = skip_negative and cfg1 == 1.0
    zero = torch.zeros_like(pos)
    expected = comfy_dual(pos, zero if skip_middle else middle, zero if skip_negative else neg, cfg1, cfg2, nested)
    assert (got - expected).abs().max() < 1e-4
    passes = [POSITIVE] + [MIDDLE] * (not skip_middle) + [NEGATIVE] * (not skip_negative)
    assert sorted(set(rows)) == sorted(passes) and len(rows) == 2 * len(passes)  # two latents, one pass each


@pytest.mark.parametrize("nested", [False, True], ids=["regular", "nested"])
def test_the_models_cfg_hooks_apply_inside_the_dual_guidance(nested: bool) -> None:
    unet, scaled = AffineUNet(), latents()
    seen: list[tuple[float, float]] = []

    def record(args: dict[str, Any]) -> torch.Tensor:
        # which conds the post-CFG hook sees as cond and uncond: their estimates' means tell them apart
        seen.append((round(float(args["cond_denoised"].mean()), 3), round(float(args["uncond_denoised"].mean()), 3)))
        return args["denoised"] + 1.0

    patches = ModelPatches(cfg_function=RescaleCfgFunction(0.7), post_cfg=(record,))
    got = denoised(call(dual_guided(unet, 4.0, 6.0, nested, patches), scaled), scaled)
    pos, middle, neg = estimates(unet, scaled)
    x = k_x(scaled)
    rescaled = lambda c, u, scale: comfy_rescale(c, u, scale, x, 0.7) + 1.0  # noqa: E731 (the hook adds 1)
    assert (got - comfy_dual(pos, middle, neg, 4.0, 6.0, nested, rescaled)).abs().max() < 1e-4
    means = [round(float(t.mean()), 3) for t in (pos, middle, neg)]
    assert seen == [(means[0], means[1]) if nested else (means[1], means[2])]


@pytest.mark.parametrize("nested", [False, True], ids=["regular", "nested"])
def test_a_cfg_pp_sampler_reads_the_uncond_its_cfg_function_saw_with_every_pass_run(nested: bool) -> None:
    unet, scaled = AffineUNet(), latents()
    guided, uncond = dual_guided(unet, 1.0, 1.0, nested).with_uncond(scaled, torch.tensor([500.0]),
                                                                      torch.tensor(2.918))
    assert len({value for values in unet.calls for value in values}) == 3  # disable_cfg1_optimization: all three
    pos, middle, neg = estimates(unet, scaled)
    assert (denoised(uncond, scaled) - (middle if nested else neg)).abs().max() < 1e-4
    assert (denoised(guided, scaled) - comfy_dual(pos, middle, neg, 1.0, 1.0, nested)).abs().max() < 1e-4


def test_the_node_has_comfyuis_inputs_and_defaults() -> None:
    cls = catalog()["DualCFGGuider"]
    assert cls.CATEGORY == "sampling/custom_sampling/guiders" and cls.RETURN_TYPES == ("GUIDER",)
    assert {k: f.default for k, f in cls.model_fields.items() if k in ("cfg_conds", "cfg_cond2_negative")} \
        == {"cfg_conds": 8.0, "cfg_cond2_negative": 8.0}
    assert cls.model_fields["style"].json_schema_extra == {"choices": ["regular", "nested"]}
    assert list(cls.model_fields) == ["model", "cond1", "cond2", "negative", "cfg_conds", "cfg_cond2_negative",
                                      "style"]


# -- graphs on the tiny SD1.5 model --------------------------------------------------------------------------------


def dual_graph(seed: int = 9, cond2: str = "autumn leaves", **inputs: Any) -> dict[str, Any]:
    base = txt2img(seed=seed)
    k = base["3"]["inputs"]
    base["30"] = {"class_type": "CLIPTextEncode", "inputs": {"text": cond2, "clip": ["4", 1]}}
    guider = {"class_type": "DualCFGGuider", "inputs": {
        "model": k["model"], "cond1": k["positive"], "cond2": ["30", 0], "negative": k["negative"],
        "cfg_conds": 7.0, "cfg_cond2_negative": 7.0, "style": "regular", **inputs}}
    return advanced(base, guider, {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}})


def test_dual_cfg_graphs_run_and_differ_from_cfg_guidance(executor: Executor) -> None:
    plain = pixels_of(executor, txt2img(seed=9))
    regular = pixels_of(executor, dual_graph(cfg_conds=3.0))
    nested = pixels_of(executor, dual_graph(style="nested"))
    assert np.abs(regular - plain).max() > 2 and np.abs(nested - plain).max() > 2
    assert np.abs(regular - nested).max() > 2
    # regular is CFG between cond1 and the negative where cfg_conds = cfg_cond2_negative, or where cond2 = cond1:
    # denoised-space rounding at most
    assert np.abs(pixels_of(executor, dual_graph()) - plain).max() <= 1
    same = dual_graph(cfg_conds=3.0)
    same["24"]["inputs"]["cond2"] = same["24"]["inputs"]["cond1"]
    assert np.abs(pixels_of(executor, same) - plain).max() <= 1


def test_the_cost_rule_holds_the_dual_guiders_conds_to_the_context_limit(executor: Executor) -> None:
    flow = dual_graph(cond2="fox " * 100)  # 154 tokens, the others 77
    flow["6"]["inputs"]["text"] = "snow " * 160  # cond1: 231 tokens
    tight = Limits(max_conditioning_tokens=400)
    [error] = refused(executor, flow, tight)["3"]["errors"]
    assert error["extra_info"]["received_value"] == 462  # lcm(231, 154, 77)
    flow["24"]["inputs"].update(cfg_conds=1.0, cfg_cond2_negative=1.0)  # regular at 1 and 1: cond1 alone
    validate_within_limits(flow, catalog(), executor.models, tight)
