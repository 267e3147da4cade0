"""The sampling loop never waits for the device: no `.item()`, no copy between host and device after the start.

A GPU runs ahead of Python only while nothing asks it for a value: a `float(tensor)`, an `if tensor`, or a
blocking copy (a CPU tensor `.to("cuda")` or an output `.cpu()`) makes the host wait until every queued kernel
has run, so the next UNet call is launched late, at every step. This machine has no GPU, so the tests run the
loop with the UNet and the latent on PyTorch's "meta" device: it keeps shapes and devices but holds no data,
and follows CUDA's device rules (a CPU scalar may meet a device tensor, a CPU tensor may not). Every op passes
through a dispatch mode that records each crossing between host and device and each value read from the device.
The start may move things once (the latent and the CPU-drawn noise, a hint, an index); every later step must
cross nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import samplers
from engine.executor import Executor
from engine.nodes.differential_diffusion import DifferentialMask
from engine.nodes.guidance import InpaintSource, guided_eps
from engine.samplers.kdiffusion import base as kdiff_base
from engine.values import CondItem, Conditioning, ControlHint

META = torch.device("meta")
ATEN = torch.ops.aten
_READS = {ATEN._local_scalar_dense.default, ATEN.is_nonzero.default, ATEN.nonzero.default, ATEN.equal.default}
# The output of a few ops whose meta kernels are PyTorch's Python reference decompositions, slow for shape work:
# three quarters of these tests' time went to them (group_norm 27%, linear 18%, layer_norm 17%, attention 15%).
# They are one kernel each on a GPU and cross nothing; taken only when every tensor they get is on the device, so a
# CPU tensor meeting a device one still reaches the real kernel and fails there
_SHAPES = {
    ATEN.group_norm.default: lambda x, *rest: torch.empty_like(x),
    ATEN.layer_norm.default: lambda x, *rest: torch.empty_like(x),
    ATEN.linear.default: lambda x, weight, *rest: x.new_empty((*x.shape[:-1], weight.shape[0])),
    ATEN.scaled_dot_product_attention.default: lambda q, k, v, *rest, **kw: q.new_empty((*q.shape[:-1], v.shape[-1])),
}

# Not held to it, each for a reason that is not Noodle's loop:
WAITS = {
    # its step size control reads the error norm on the host each try (as ComfyUI's does)
    "dpm_adaptive",
    # diffusers' UniPC builds its coefficients with torch.tensor(..., device=...) at every step (ComfyUI's too)
    "uni_pc", "uni_pc_bh2",
}
# ComfyUI's BrownianTreeNoiseSampler(cpu=True): the tree lives on the host, and each step's draw crosses once
CPU_TREE = {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
# their Brownian tree lives on the device (torchsde), which the meta device cannot hold
DEVICE_TREE = {name for name in samplers.SUPPORTED_SAMPLERS if name.endswith("_gpu")}
HELD = [name for name in samplers.SUPPORTED_SAMPLERS if name not in WAITS | CPU_TREE | DEVICE_TREE]
STEPS = 4


@dataclasses.dataclass
class Crossing:
    step: int  # the ComfyUI step it happened in (0: the start and the first step)
    what: str
    where: str


class HostSyncs(TorchDispatchMode):
    """Records every copy between host and device and every value read from a device tensor, with the step."""

    def __init__(self) -> None:
        super().__init__()
        self.crossings: list[Crossing] = []
        self.step = 0

    def _note(self, what: str) -> None:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack()
                  if "/engine/" in f.filename or "/diffusers/" in f.filename]
        self.crossings.append(Crossing(self.step, what, " < ".join(reversed(frames[-4:]))))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func in _SHAPES and all(t.device == META for t in tensors):
            return _SHAPES[func](*args, **kwargs)
        if func in _READS and any(t.device == META for t in tensors):
            self._note(f"{func.__name__} reads a device value")
            raise AssertionError(f"the loop reads a value from the device: {self.crossings[-1]}")
        if func.overloadpacket in (ATEN._to_copy, ATEN.to) and isinstance(args[0], torch.Tensor):
            targets = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.device)]
            targets += [a.device for a in args[1:] if isinstance(a, torch.Tensor)]
            if targets and targets[0] != args[0].device:
                self._note(f"{args[0].device.type} -> {targets[0].type} {tuple(args[0].shape)}")
                if args[0].device == META:  # what a copy back would hand the host: a tensor of that shape
                    return torch.empty(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is ATEN.copy_.default and args[0].device != args[1].device:
            self._note(f"{args[1].device.type} -> {args[0].device.type} {tuple(args[1].shape)}")
        return func(*args, **kwargs)


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(META)


@pytest.fixture(scope="module")
def sd15_unet(executor: Executor) -> torch.nn.Module:
    return on_meta(executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet)


@pytest.fixture(autouse=True)
def device_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The meta device has no generator: the step noise is drawn there unseeded, as on a GPU it is drawn from the
    GPU's own generator (a kernel, no host work)."""
    monkeypatch.setattr(kdiff_base.Run, "default_noise",
                        lambda self, x: lambda sigma, sigma_next: torch.randn(x.shape, dtype=x.dtype, device=x.device))
    yield


def conds(width: int, pooled: int | None = None, seed: int = 0) -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(seed)

    def one(extras: dict[str, Any] | None = None) -> Conditioning:
        embeds = torch.randn(1, 77, width, generator=g)
        return Conditioning((CondItem(embeds, None if pooled is None else torch.randn(1, pooled, generator=g),
                                      extras or {}),))
    return one(), one()


def crossings(sampler: str, eps: samplers.EpsFn, shape: tuple[int, ...] = (1, 4, 8, 8),
              scheduler: str = "karras", **kwargs: Any) -> list[Crossing]:
    sigmas = samplers.ksampler_sigmas(scheduler, STEPS, 1.0, samplers.DEFAULT_SAMPLING, sampler_name=sampler)
    plan = samplers.build_scheduler(sampler, scheduler, sigmas, 1, device=META)
    g = torch.Generator().manual_seed(1)
    latent, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mode = HostSyncs()

    def after_step(index: int, total: int, x: torch.Tensor) -> None:
        mode.step = index + 1

    with torch.inference_mode(), mode:
        out = samplers.sample(plan, eps, latent, noise, callback=after_step, device=META, **kwargs)
    assert out.device == META and out.shape == shape  # the result stays on the device, for one copy back
    assert mode.step == STEPS
    return mode.crossings


def later(found: list[Crossing]) -> list[Crossing]:
    return [c for c in found if c.step >= 1]


@pytest.mark.parametrize("sampler", HELD)
def test_no_step_after_the_first_crosses_between_host_and_device(sd15_unet: torch.nn.Module, sampler: str) -> None:
    positive, negative = conds(sd15_unet.config.cross_attention_dim)
    found = crossings(sampler, guided_eps(sd15_unet, positive, negative, 7.0, False, (64, 64)))
    assert later(found) == []
    # the start moves the latent and the noise, once each
    assert [c.what for c in found] == ["cpu -> meta (1, 4, 8, 8)"] * 2


@pytest.mark.parametrize("sampler", sorted(CPU_TREE))
def test_the_cpu_brownian_tree_samplers_cross_only_with_each_steps_noise(sd15_unet: torch.nn.Module,
                                                                         sampler: str) -> None:
    positive, negative = conds(sd15_unet.config.cross_attention_dim)
    found = later(crossings(sampler, guided_eps(sd15_unet, positive, negative, 7.0, False, (64, 64))))
    assert found and {c.what for c in found} == {"cpu -> meta (1, 4, 8, 8)"}
    # a draw per model call at most (two a step for dpmpp_sde): ComfyUI's own host-to-device noise
    assert len(found) <= 2 * (STEPS - 1)


@pytest.mark.parametrize("sampler", sorted(WAITS))
def test_the_samplers_left_out_do_wait_so_the_list_stays_true(sd15_unet: torch.nn.Module, sampler: str) -> None:
    positive, negative = conds(sd15_unet.config.cross_attention_dim)
    eps = guided_eps(sd15_unet, positive, negative, 7.0, False, (64, 64))
    try:
        found = later(crossings(sampler, eps))
    except (AssertionError, RuntimeError):  # a value read from the device (meta has none to give)
        return
    assert found, f"{sampler} no longer waits for the device: move it to HELD"


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "heun"])
def test_cfg_one_a_noise_mask_area_conds_and_a_controlnet_cross_nothing_after_the_start(
        executor: Executor, sd15_unet: torch.nn.Module, sampler: str) -> None:
    width = sd15_unet.config.cross_attention_dim
    positive, negative = conds(width)
    assert later(crossings(sampler, guided_eps(sd15_unet, positive, negative, 1.0, False, (64, 64)))) == []

    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    eps = guided_eps(sd15_unet, positive, negative, 7.0, False, (64, 64))
    assert later(crossings(sampler, eps, denoise_mask=mask)) == []
    # DifferentialDiffusion's per-step mask: its threshold is a host number, never a copy per model call
    differential = functools.partial(DifferentialMask(0.5), sampling=samplers.DEFAULT_SAMPLING)
    assert later(crossings(sampler, eps, denoise_mask=mask, denoise_mask_function=differential)) == []

    mask_cond = dataclasses.replace(positive.items[0], extras={"mask": mask, "mask_strength": 0.7})
    area_cond = dataclasses.replace(positive.items[0], extras={"area": (4, 4, 2, 2), "strength": 1.5})
    regional = Conditioning((positive.items[0], area_cond, mask_cond))  # ConditioningSetArea and SetMask
    assert later(crossings(sampler, guided_eps(sd15_unet, regional, negative, 7.0, False, (64, 64)))) == []

    net = executor.models.controlnet("tiny-controlnet-sd15.safetensors")
    hint = ControlHint(dataclasses.replace(net, module=on_meta(net.module)), torch.rand(1, 3, 64, 64), 0.8)
    controlled = Conditioning((dataclasses.replace(positive.items[0], extras={"control": hint}),))
    assert later(crossings(sampler, guided_eps(sd15_unet, controlled, negative, 7.0, False, (64, 64)))) == []


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_crosses_nothing_after_the_start(executor: Executor, sampler: str) -> None:
    unet = on_meta(executor.models.checkpoint("tiny-sdxl.safetensors").pipe.unet)
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    positive, negative = conds(config.cross_attention_dim, pooled)
    found = crossings(sampler, guided_eps(unet, positive, negative, 7.0, True, (64, 64)))
    assert later(found) == []


def test_an_inpainting_unets_concat_is_put_on_the_device_once(executor: Executor) -> None:
    unet = on_meta(executor.models.checkpoint("tiny-sd15-inpainting.safetensors").pipe.unet)
    assert unet.config.in_channels == 9
    positive, negative = conds(unet.config.cross_attention_dim)
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 8:40] = 1.0
    source = InpaintSource(torch.randn(1, 4, 8, 8), mask, 0.18215)
    eps = guided_eps(unet, positive, negative, 7.0, False, (64, 64), inpaint=source)
    assert later(crossings("euler", eps, denoise_mask=mask)) == []


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_gligen_boxes_are_put_on_the_device_once(sd15_unet: torch.nn.Module, sampler: str) -> None:
    from engine.models.gligen import build_gligen
    from engine.values import GligenRef
    from tests.engine.nodes.test_gligen import TINY_KEY_DIM, TINY_LAYERS, gligen_state

    gligen = GligenRef(on_meta(build_gligen("tiny", gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=7))), "tiny")
    g = torch.Generator().manual_seed(3)
    boxes = ("position", gligen, [(torch.randn(1, TINY_KEY_DIM, generator=g), 3, 4, 1, 2),
                                  (torch.randn(1, TINY_KEY_DIM, generator=g), 2, 2, 5, 5)])
    positive, negative = conds(sd15_unet.config.cross_attention_dim)
    boxed = Conditioning((dataclasses.replace(positive.items[0], extras={"gligen": boxes}),))
    found = crossings(sampler, guided_eps(sd15_unet, boxed, negative, 7.0, False, (64, 64)))
    assert later(found) == []
    # the start: the latent, the noise, the boxes' three tensors (both sides share them) and the two rows' index
    assert len(found) == 2 + 3 + 1
