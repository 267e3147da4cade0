"""RescaleCFG, PerturbedAttentionGuidance and SelfAttentionGuidance against ComfyUI 0.3.64's math written out here
(comfy/samplers.py cfg_function; comfy_extras/nodes_model_advanced.py, nodes_pag.py, nodes_sag.py), through
guided_eps on a recording fake UNet and on the tiny SD1.5 UNet itself (whose middle block the attention patches
change); how the hooks compose, that the shared UNet's processors come back, that with_uncond always runs the uncond
pass; and one graph per node on the tiny models, which runs and changes the picture."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.executor import Executor
from engine.nodes import catalog
from engine.nodes.attention_replace import Attn1Slot, middle_attn1
from engine.nodes.guidance import guided_eps
from engine.nodes.guidance_patches import PerturbedAttentionPatch, RescaleCfgFunction
from engine.settings import Limits
from engine.tiny import tiny_components
from engine.values import CondItem, Conditioning, ModelPatches
from tests.engine.nodes.test_conditioning_ops import graph
from tests.engine.nodes.test_inpaint import values_of

SIGMA = 2.918  # a mid-schedule sigma of SD1.5's normal schedule


def cond(seed: int, value: float | None = None, width: int = 32) -> Conditioning:
    """One random (or constant `value`) text cond [1, 77, width]."""
    if value is not None:
        return Conditioning((CondItem(torch.full((1, 77, width), value)),))
    return Conditioning((CondItem(torch.randn((1, 77, width), generator=torch.Generator().manual_seed(seed))),))


class AffineUNet(torch.nn.Module):
    """eps = 0.3 x + (its context's mean) * a ramp over the width: varied per cond and per pixel (RescaleCFG's
    spreads differ); records each call's per-row context means."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[list[float]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> Any:
        means = encoder_hidden_states.mean(dim=(1, 2))
        self.calls.append([round(float(m), 4) for m in means])
        ramp = torch.linspace(0.5, 1.5, x.shape[-1])
        return SimpleNamespace(sample=0.3 * x + means.view(-1, 1, 1, 1) * ramp)


def latents(seed: int = 3, batch: int = 2, side: int = 8) -> torch.Tensor:
    """Scaled latents as a sampler hands them to the model at SIGMA."""
    return torch.randn((batch, 4, side, side), generator=torch.Generator().manual_seed(seed))


def k_x(scaled: torch.Tensor) -> torch.Tensor:
    return scaled * math.sqrt(SIGMA**2 + 1)


def denoised(eps: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    return k_x(scaled) - SIGMA * eps


def plain_eps(unet: torch.nn.Module, side: Conditioning, scaled: torch.Tensor) -> torch.Tensor:
    """One cond's own noise prediction (cfg 1, nothing patched)."""
    return guided_eps(unet, side, side, 1.0, False, (64, 64))(scaled, torch.tensor([500.0]), torch.tensor(SIGMA))


def call(eps: Any, scaled: torch.Tensor) -> torch.Tensor:
    return eps(scaled, torch.tensor([500.0]), torch.tensor(SIGMA))


# -- ComfyUI's math, written out ----------------------------------------------------------------------------------


def comfy_rescale(cond_d: torch.Tensor, uncond_d: torch.Tensor, scale: float, x: torch.Tensor,
                  multiplier: float) -> torch.Tensor:
    """cfg_function with RescaleCFG's sampler_cfg_function: the guided denoised estimate."""
    sigma = torch.full((x.shape[0],), SIGMA).view(-1, 1, 1, 1)
    c, u = x - cond_d, x - uncond_d  # args["cond"], args["uncond"]
    xs = x / (sigma * sigma + 1.0)
    c = ((xs - (x - c)) * (sigma**2 + 1.0) ** 0.5) / sigma
    u = ((xs - (x - u)) * (sigma**2 + 1.0) ** 0.5) / sigma
    x_cfg = u + scale * (c - u)
    x_rescaled = x_cfg * (torch.std(c, dim=(1, 2, 3), keepdim=True) / torch.std(x_cfg, dim=(1, 2, 3), keepdim=True))
    x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
    return x - (x - (xs - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))


def comfy_gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    ksize_half = (kernel_size - 1) * 0.5
    x = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    x_kernel = pdf / pdf.sum()
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    img = F.pad(img, [kernel_size // 2] * 4, mode="reflect")
    return F.conv2d(img, kernel2d, groups=img.shape[-3])


def comfy_blur_map(x0: torch.Tensor, attn: torch.Tensor, sigma: float, threshold: float = 1.0) -> torch.Tensor:
    _, hw1, hw2 = attn.shape
    b, _, lh, lw = x0.shape
    mask = attn.reshape(b, -1, hw1, hw2).mean(1, keepdim=False).sum(1, keepdim=False) > threshold
    total = mask.shape[-1]
    x = round(math.sqrt((lh / lw) * total))
    xx = None
    for i in range(0, math.floor(math.sqrt(total) / 2)):
        for j in [(x + i), max(1, x - i)]:
            if total % j == 0:
                xx = j
                break
        if xx is not None:
            break
    mask = mask.reshape(b, xx, total // xx).unsqueeze(1).type(attn.dtype)
    mask = F.interpolate(mask, (lh, lw))
    return comfy_gaussian_blur(x0, 9, sigma) * mask + x0 * (1 - mask)


class Recorder:
    """A reference attention processor: diffusers' own math, optionally keeping the softmax map (heads split
    latent-major, as ComfyUI's attention_basic_with_sim) or returning the value projection (PAG's)."""

    def __init__(self, value_only: bool = False) -> None:
        self.value_only, self.maps = value_only, []

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.value_only:
            return attn.to_out[1](attn.to_out[0](v))
        b, n, inner = q.shape
        heads, d = attn.heads, inner // attn.heads
        split = [t.reshape(b, n, heads, d).permute(0, 2, 1, 3).reshape(b * heads, n, d) for t in (q, k, v)]
        sim = (split[0] @ split[1].transpose(1, 2) * d**-0.5).softmax(-1)
        self.maps.append(sim)
        out = (sim @ split[2]).reshape(b, heads, n, d).permute(0, 2, 1, 3).reshape(b, n, inner)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    return tiny_components("sd15", seed=0).unet


def with_processor(unet: torch.nn.Module, processor: Any, block: int | None = None) -> Any:
    """Set `processor` on the middle block's attn1 (one block or all); returns a function that puts them back."""
    blocks = middle_attn1(unet)
    chosen = blocks if block is None else [blocks[block]]
    before = [a.processor for a in chosen]
    for a in chosen:
        a.set_processor(processor)
    return lambda: [a.set_processor(p) for a, p in zip(chosen, before)]


def node(class_type: str, model_patches: ModelPatches | None = None, **inputs: Any) -> ModelPatches:
    """A patch node's run on a stand-in MODEL: the ModelPatches it returns."""
    model = SimpleNamespace(patches=model_patches or ModelPatches(), with_patches=lambda p: SimpleNamespace(patches=p))
    (out,) = catalog()[class_type].model_construct(model=model, **inputs).run(SimpleNamespace())
    return out.patches


# -- the hooks' math -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "multiplier"), [(7.0, 0.7), (3.5, 1.0), (1.0, 0.7), (7.0, 0.0)])
def test_rescale_cfg_is_comfyuis_on_the_denoised_estimates(cfg: float, multiplier: float) -> None:
    unet, scaled = AffineUNet(), latents()
    positive, negative = cond(1, 0.8), cond(2, -0.4)
    patches = node("RescaleCFG", multiplier=multiplier)
    got = denoised(call(guided_eps(unet, positive, negative, cfg, False, (64, 64), patches=patches), scaled), scaled)
    cond_d = denoised(plain_eps(unet, positive, scaled), scaled)
    # at cfg 1 ComfyUI skips the uncond pass: its estimate is 0
    uncond_d = torch.zeros_like(cond_d) if cfg == 1.0 else denoised(plain_eps(unet, negative, scaled), scaled)
    expected = comfy_rescale(cond_d, uncond_d, cfg, k_x(scaled), multiplier)
    assert (got - expected).abs().max() < 1e-4
    if multiplier == 0.0:  # the plain CFG
        assert (got - (uncond_d + (cond_d - uncond_d) * cfg)).abs().max() < 1e-4


def test_the_passes_at_cfg_1_follow_comfyui() -> None:
    positive, negative = cond(1, 0.8), cond(2, -0.4)
    for class_type, inputs, passes in (("RescaleCFG", {"multiplier": 0.7}, [[0.8, 0.8]]),
                                        ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0},
                                         [[0.8, 0.8, -0.4, -0.4]])):
        unet = AffineUNet()
        # 4-cell latents: SAG leaves them alone, so only the pass that disable_cfg1_optimization adds shows
        eps = guided_eps(unet, positive, negative, 1.0, False, (32, 32), patches=node(class_type, **inputs))
        call(eps, latents(side=4))
        assert unet.calls == passes


def test_perturbed_attention_guidance_is_comfyuis(tiny_unet: torch.nn.Module) -> None:
    scaled, positive, negative, cfg, scale = latents(side=8), cond(1), cond(2), 6.0, 3.0
    got = denoised(call(guided_eps(tiny_unet, positive, negative, cfg, False, (64, 64),
                                   patches=node("PerturbedAttentionGuidance", scale=scale)), scaled), scaled)
    cond_d = denoised(plain_eps(tiny_unet, positive, scaled), scaled)
    uncond_d = denoised(plain_eps(tiny_unet, negative, scaled), scaled)
    restore = with_processor(tiny_unet, Recorder(value_only=True))
    try:
        pag = denoised(plain_eps(tiny_unet, positive, scaled), scaled)
    finally:
        restore()
    expected = uncond_d + (cond_d - uncond_d) * cfg + (cond_d - pag) * scale
    assert (got - expected).abs().max() < 1e-4
    assert (cond_d - pag).abs().max() > 1e-3  # the perturbed pass does differ


def test_perturbed_attention_guidance_at_scale_0_is_the_plain_cfg(tiny_unet: torch.nn.Module) -> None:
    scaled, positive, negative = latents(), cond(1), cond(2)
    plain = call(guided_eps(tiny_unet, positive, negative, 6.0, False, (64, 64)), scaled)
    got = call(guided_eps(tiny_unet, positive, negative, 6.0, False, (64, 64),
                          patches=node("PerturbedAttentionGuidance", scale=0.0)), scaled)
    assert (got - plain).abs().max() < 1e-4


@pytest.mark.parametrize(("cfg", "scale", "blur_sigma"), [(6.0, 0.5, 2.0), (1.0, 1.5, 0.7), (4.0, -1.0, 5.0)])
def test_self_attention_guidance_is_comfyuis(tiny_unet: torch.nn.Module, cfg: float, scale: float,
                                             blur_sigma: float) -> None:
    scaled, positive, negative = latents(side=8), cond(1), cond(2)
    got = denoised(call(guided_eps(tiny_unet, positive, negative, cfg, False, (64, 64),
                                   patches=node("SelfAttentionGuidance", scale=scale, blur_sigma=blur_sigma)),
                        scaled), scaled)
    cond_d = denoised(plain_eps(tiny_unet, positive, scaled), scaled)
    recorder = Recorder()
    restore = with_processor(tiny_unet, recorder, block=0)
    try:
        uncond_d = denoised(plain_eps(tiny_unet, negative, scaled), scaled)
    finally:
        restore()
    x = k_x(scaled)
    degraded = comfy_blur_map(uncond_d, recorder.maps[0], blur_sigma)
    degraded_noised = degraded + x - uncond_d
    sag = denoised(plain_eps(tiny_unet, negative, degraded_noised / math.sqrt(SIGMA**2 + 1)),
                   degraded_noised / math.sqrt(SIGMA**2 + 1))
    expected = uncond_d + (cond_d - uncond_d) * cfg + (degraded - sag) * scale
    assert (got - expected).abs().max() < 1e-4
    assert (degraded - uncond_d).abs().max() > 1e-3  # some of the picture is blurred


def test_self_attention_guidance_leaves_latents_of_4_cells_alone(tiny_unet: torch.nn.Module) -> None:
    scaled, positive, negative = latents(side=4), cond(1), cond(2)
    plain = call(guided_eps(tiny_unet, positive, negative, 6.0, False, (32, 32)), scaled)
    got = call(guided_eps(tiny_unet, positive, negative, 6.0, False, (32, 32),
                          patches=node("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0)), scaled)
    assert (got - plain).abs().max() < 1e-4


# -- composition, the shared UNet, with_uncond ---------------------------------------------------------------------


def test_patches_compose_in_order_and_a_later_rescale_replaces_the_earlier() -> None:
    patches = node("RescaleCFG", node("RescaleCFG", multiplier=0.2), multiplier=0.9)
    assert patches.cfg_function == RescaleCfgFunction(0.9)
    patches = node("SelfAttentionGuidance", node("PerturbedAttentionGuidance", patches, scale=2.0), scale=0.5,
                   blur_sigma=2.0)
    assert [type(p).__name__ for p in patches.post_cfg] == ["PerturbedAttentionPatch", "SelfAttentionPatch"]
    assert patches.post_cfg[0] == PerturbedAttentionPatch(2.0) and patches.disable_cfg1_optimization
    assert [key for key, _ in patches.attn1_replace] == [("middle", 0, 0)]
    assert patches.cfg_function == RescaleCfgFunction(0.9)  # kept through the other nodes


def test_post_cfg_hooks_run_in_order_on_the_cfg_functions_result() -> None:
    seen: list[str] = []

    def double(args: dict[str, Any]) -> torch.Tensor:
        seen.append("double")
        return args["denoised"] * 2

    def shift(args: dict[str, Any]) -> torch.Tensor:
        seen.append("shift")
        assert args["cond_scale"] == 5.0 and args["sigma"].shape == (2,)
        return args["denoised"] + 1

    unet, scaled, positive, negative = AffineUNet(), latents(), cond(1, 0.8), cond(2, -0.4)
    patches = ModelPatches(cfg_function=RescaleCfgFunction(0.5), post_cfg=(double, shift))
    got = denoised(call(guided_eps(unet, positive, negative, 5.0, False, (64, 64), patches=patches), scaled), scaled)
    cond_d, uncond_d = (denoised(plain_eps(unet, c, scaled), scaled) for c in (positive, negative))
    assert seen == ["double", "shift"]
    assert (got - (comfy_rescale(cond_d, uncond_d, 5.0, k_x(scaled), 0.5) * 2 + 1)).abs().max() < 1e-4


def test_sag_and_pag_leave_the_shared_unets_processors_as_they_were(tiny_unet: torch.nn.Module) -> None:
    before = {name: type(p) for name, p in tiny_unet.attn_processors.items()}
    objects = [a.processor for a in middle_attn1(tiny_unet)]
    patches = node("SelfAttentionGuidance", node("PerturbedAttentionGuidance", scale=3.0), scale=0.5, blur_sigma=2.0)
    call(guided_eps(tiny_unet, cond(1), cond(2), 6.0, False, (64, 64), patches=patches), latents())
    assert [a.processor for a in middle_attn1(tiny_unet)] == objects
    assert {name: type(p) for name, p in tiny_unet.attn_processors.items()} == before

    def failing(args: dict[str, Any]) -> torch.Tensor:  # a hook whose extra pass fails inside the UNet
        def broken(*_: Any) -> torch.Tensor:
            raise RuntimeError("out of memory")
        options = {**args["model_options"], "attn1": {("middle", 0): broken}}
        return args["model"].calc_cond_batch([args["cond"]], args["input"], args["sigma"], options)[0]

    with pytest.raises(RuntimeError, match="out of memory"):
        call(guided_eps(tiny_unet, cond(1), cond(2), 6.0, False, (64, 64),
                        patches=patches.replace(post_cfg=(*patches.post_cfg, failing))), latents())
    assert [a.processor for a in middle_attn1(tiny_unet)] == objects
    assert all(isinstance(a.processor, AttnProcessor2_0) for a in middle_attn1(tiny_unet))


def test_a_blocks_own_replacement_wins_over_the_block_wide_one_as_comfyuis_lookup() -> None:
    unet = tiny_components("sdxl", seed=0).unet
    blocks = middle_attn1(unet)
    assert len(blocks) == 2  # the tiny SDXL's middle block has two transformer blocks, as SDXL's has ten

    def first(*_: Any) -> torch.Tensor: ...
    def wide(*_: Any) -> torch.Tensor: ...

    slot, seen = Attn1Slot({("middle", 0): wide}), []
    with slot.using({("middle", 0): wide, ("middle", 0, 0): first}, 0):
        slot.run(unet, lambda: seen.append([a.processor.fn for a in blocks]) or torch.zeros(1), [0], [1], [0])
    slot.run(unet, lambda: seen.append([a.processor.fn for a in blocks]) or torch.zeros(1), [0], [1], [0])
    assert seen == [[first, wide], [wide, wide]]
    assert all(isinstance(a.processor, AttnProcessor2_0) for a in blocks)
    with pytest.raises(ValueError, match="only the middle block"):
        Attn1Slot({("input", 4): wide})


def test_with_uncond_runs_the_uncond_pass_at_cfg_1_and_gives_the_guided_and_uncond_predictions() -> None:
    unet, scaled, positive, negative = AffineUNet(), latents(), cond(1, 0.8), cond(2, -0.4)
    eps = guided_eps(unet, positive, negative, 1.0, False, (64, 64))
    call(eps, scaled)
    assert unet.calls == [[0.8, 0.8]]  # the plain call skips the uncond pass, as ComfyUI
    guided, uncond = eps.with_uncond(scaled, torch.tensor([500.0]), torch.tensor(SIGMA))
    assert unet.calls[1] == [0.8, 0.8, -0.4, -0.4]
    assert torch.allclose(guided, plain_eps(unet, positive, scaled), atol=1e-5)
    assert torch.allclose(uncond, plain_eps(unet, negative, scaled), atol=1e-5)
    # with a hook: the post-CFG result and the uncond's own prediction
    hooked = guided_eps(unet, positive, negative, 1.0, False, (64, 64), patches=ModelPatches(
        post_cfg=(lambda args: args["denoised"] + args["uncond_denoised"],)))
    guided, uncond = hooked.with_uncond(scaled, torch.tensor([500.0]), torch.tensor(SIGMA))
    cond_d, uncond_d = (denoised(plain_eps(unet, c, scaled), scaled) for c in (positive, negative))
    assert (denoised(guided, scaled) - (cond_d + uncond_d)).abs().max() < 1e-4
    assert (denoised(uncond, scaled) - uncond_d).abs().max() < 1e-4


def test_the_nodes_have_comfyuis_inputs_defaults_and_ranges() -> None:
    nodes = catalog()
    names = ("RescaleCFG", "PerturbedAttentionGuidance", "SelfAttentionGuidance")
    ranges = {name: {key: (f.default, *(getattr(m, attr) for m in f.metadata for attr in ("ge", "le")
                                        if hasattr(m, attr)))
                     for key, f in nodes[name].model_fields.items() if key != "model"} for name in names}
    assert ranges == {"RescaleCFG": {"multiplier": (0.7, 0.0, 1.0)},
                      "PerturbedAttentionGuidance": {"scale": (3.0, 0.0, 100.0)},
                      "SelfAttentionGuidance": {"scale": (0.5, -2.0, 5.0), "blur_sigma": (2.0, 0.0, 10.0)}}
    assert [nodes[n].CATEGORY for n in names] == [
        "advanced/model", "model_patches/unet", "_for_testing"]
    [(name, message)] = nodes["SelfAttentionGuidance"].check_values({"blur_sigma": 0.0}, Limits())
    assert name == "blur_sigma" and "above 0" in message


# -- graphs on the tiny models -------------------------------------------------------------------------------------


def patched(workflow: dict[str, Any], *nodes: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """`workflow` with the patch nodes chained between its checkpoint's MODEL and its KSampler."""
    workflow, model = copy.deepcopy(workflow), ["4", 0]
    for index, (class_type, inputs) in enumerate(nodes):
        workflow[f"2{index}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"2{index}", 0]
    workflow["3"]["inputs"]["model"] = model
    return workflow


def pixels(executor: Executor, workflow: dict[str, Any]) -> torch.Tensor:
    return values_of(executor, workflow)["8"][0].pixels


@pytest.mark.parametrize("nodes", [
    [("RescaleCFG", {"multiplier": 0.7})],
    [("PerturbedAttentionGuidance", {"scale": 3.0})],
    [("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})],
    [("RescaleCFG", {"multiplier": 0.7}), ("PerturbedAttentionGuidance", {"scale": 3.0}),
     ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})],
], ids=["rescale", "pag", "sag", "all three"])
def test_each_patch_runs_in_a_graph_and_changes_the_picture(executor: Executor, nodes: list[Any]) -> None:
    plain = pixels(executor, graph())
    got = pixels(executor, patched(graph(), *nodes))
    assert torch.isfinite(got).all()
    assert (got - plain).abs().max() > 1e-3
    assert torch.equal(pixels(executor, graph()), plain)  # the shared UNet is unpatched again


def test_sag_runs_on_the_tiny_sdxl_model(executor: Executor) -> None:
    def sdxl(workflow: dict[str, Any]) -> dict[str, Any]:
        workflow["4"]["inputs"]["ckpt_name"] = "tiny-sdxl.safetensors"
        return workflow

    plain = pixels(executor, sdxl(graph()))
    got = pixels(executor, sdxl(patched(graph(), ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
                                        ("PerturbedAttentionGuidance", {"scale": 2.0}))))
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-3


def test_sag_without_a_negative_says_why_it_cannot_run(tiny_unet: torch.nn.Module) -> None:
    # BasicGuider's missing negative: ComfyUI fails on the missing map; here the message names the cause
    eps = guided_eps(tiny_unet, cond(1), Conditioning(()), 1.0, False, (64, 64),
                     patches=node("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0))
    with pytest.raises(ValueError, match="no self-attention map of the negative"):
        call(eps, latents())


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_a_cfg_pp_sampler_runs_with_sag_and_pag(executor: Executor, cfg: float) -> None:
    workflow = graph()
    workflow["3"]["inputs"].update(sampler_name="euler_cfg_pp", cfg=cfg)
    plain = pixels(executor, workflow)
    got = pixels(executor, patched(workflow, ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
                                   ("PerturbedAttentionGuidance", {"scale": 3.0})))
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-3


def test_with_sag_on_the_model_pags_pass_keeps_sags_block_as_comfyuis_lookup_does(
        tiny_unet: torch.nn.Module) -> None:
    # SD1.x's middle block has one transformer block, keyed ("middle", 0, 0) by SAG: it wins over PAG's
    # ("middle", 0), so PAG's pass is the plain cond and PAG adds nothing, in ComfyUI too
    sag = node("SelfAttentionGuidance", scale=0.5, blur_sigma=2.0)
    both = node("PerturbedAttentionGuidance", sag, scale=3.0)
    alone = call(guided_eps(tiny_unet, cond(1), cond(2), 6.0, False, (64, 64), patches=sag), latents())
    got = call(guided_eps(tiny_unet, cond(1), cond(2), 6.0, False, (64, 64), patches=both), latents())
    assert (got - alone).abs().max() < 1e-4
    pag_first = node("SelfAttentionGuidance", node("PerturbedAttentionGuidance", scale=3.0), scale=0.5, blur_sigma=2.0)
    got = call(guided_eps(tiny_unet, cond(1), cond(2), 6.0, False, (64, 64), patches=pag_first), latents())
    assert (got - alone).abs().max() < 1e-4  # the order of the nodes does not matter: the lookup is per call
