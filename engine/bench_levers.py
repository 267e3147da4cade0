"""The UNet levers of the speed issue, one UNet call each, for `noodle bench gpu`'s lever stage.

One call as the sampler makes it (a batch of two: the cond and the uncond, a 77-token context, SDXL's pooled text
and size conditioning), in the UNet's own dtype and device, timed after warm-ups (the median of `repeats` rounds of
CALLS calls), for each lever against the plain call:
- cuda_graph: the call replayed as a CUDA graph ([engine] cuda_graphs; engine/models/cuda_graphs.py), CUDA only,
  with the memory it kept reserved (kept_gib) and what a second graph (a batch of one) adds to it in the shared
  pool (second_graph_kept_gib);
- fused_qkv: diffusers' fuse_qkv_projections (one matrix product for q, k and v in self-attention);
- channels_last: weights and latents in NHWC memory order.
Each lever's output is compared with the plain call's (max_abs_diff, equal: bit for bit), so a lever that would
change pixels says so. Measured on this 2-core CPU, 32x32 latents, fp32 (2026-12-03, one run each): fused QKV
bit for bit and no faster (2.01-2.17 s against 1.95-2.13 s), channels_last 4.7e-6 apart and 10% slower; not
turned on here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from engine.bench import timed
from engine.models.cuda_graphs import UnetGraphs

__all__ = ["CALLS", "unet_inputs", "unet_levers"]

CALLS = 5  # calls timed together in one round: a GPU call is milliseconds


def unet_inputs(unet: torch.nn.Module, side: int) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """One sampler call's arguments for a side x side picture, seeded: (latents, timestep), keyword arguments."""
    config = unet.config  # type: ignore[attr-defined]
    device, dtype = unet.device, unet.dtype  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    x = noise(2, config.in_channels, side // 8, side // 8)
    t = torch.full((2,), 500.0, device=device)
    kwargs: dict[str, Any] = {"encoder_hidden_states": noise(2, 77, config.cross_attention_dim)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and the size conditioning
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": noise(2, pooled),
                                       "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2,
                                                                device=device, dtype=dtype)}
    return (x, t), kwargs


def unet_levers(unet: torch.nn.Module, side: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Milliseconds a call for the plain UNet and each lever, and how far each lever's output is from the plain
    one; the UNet is left as it was."""
    args, kwargs = unet_inputs(unet, side)
    cuda = args[0].device.type == "cuda"

    def plain(*a: Any, **k: Any) -> Any:
        return unet(*a, **k)

    found: dict[str, dict[str, Any]] = {}
    # no_grad, not inference_mode: channels_last and fused QKV make new weights, which must stay ordinary tensors
    # (peft cannot switch a LoRA on weights made in inference mode), also when the caller is in inference mode
    with torch.inference_mode(False), torch.no_grad():
        base_ms, base = _timed(plain, args, kwargs, repeats)
        found["plain"] = {"ms": base_ms}
        if cuda:
            graphs = UnetGraphs()
            graphed = graphs.forward(unet)
            assert graphed is not None
            reserved = torch.cuda.memory_reserved()
            found["cuda_graph"] = _lever(graphed, args, kwargs, repeats, base_ms, base)
            # what the capture kept reserved (mostly the graph's private pool): what a byte cap would count
            found["cuda_graph"]["kept_gib"] = round((torch.cuda.memory_reserved() - reserved) / 2**30, 3)
            # a second graph (the batch of one a cfg 1 run makes) in the same pool: what it adds on top
            reserved = torch.cuda.memory_reserved()
            graphed(*(a[:1] for a in args), **_first_of_batch(kwargs))
            found["cuda_graph"]["second_graph_kept_gib"] = round((torch.cuda.memory_reserved() - reserved) / 2**30, 3)
            graphs.clear()  # the pool back to torch's cache
        with _fused_qkv(unet):
            found["fused_qkv"] = _lever(plain, args, kwargs, repeats, base_ms, base)
        with _channels_last(unet):
            nhwc = (args[0].to(memory_format=torch.channels_last), args[1])
            found["channels_last"] = _lever(plain, nhwc, kwargs, repeats, base_ms, base)
    return found


def _first_of_batch(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of unet_inputs for a batch of one."""
    return {key: _first_of_batch(value) if isinstance(value, dict) else value[:1] for key, value in kwargs.items()}


def _lever(call: Callable[..., Any], args: tuple[torch.Tensor, ...], kwargs: dict[str, Any], repeats: int,
           base_ms: float, base: torch.Tensor) -> dict[str, Any]:
    ms, out = _timed(call, args, kwargs, repeats)
    diff = float((out.float() - base.float()).abs().max())
    return {"ms": ms, "vs_plain": round(ms / base_ms, 3), "max_abs_diff": diff, "equal": diff == 0.0}


def _timed(call: Callable[..., Any], args: tuple[torch.Tensor, ...], kwargs: dict[str, Any],
           repeats: int) -> tuple[float, torch.Tensor]:
    """The median milliseconds of one call over `repeats` rounds, after a round of warm-up; the last output."""
    last = [call(*args, **kwargs).sample]  # the first call (for a graph: its capture)

    def calls() -> None:
        for _ in range(CALLS):
            last[0] = call(*args, **kwargs).sample

    rounds = [timed(calls) / CALLS for _ in range(repeats + 1)]
    return round(statistics.median(rounds[1:]) * 1000, 2), last[0].contiguous()


@contextmanager
def _fused_qkv(unet: torch.nn.Module) -> Iterator[None]:
    unet.fuse_qkv_projections()  # type: ignore[operator]
    try:
        yield
    finally:
        unet.unfuse_qkv_projections()  # type: ignore[operator]
        for module in unet.modules():  # diffusers' unfuse keeps the fused copies of the weights: not needed now
            for name in ("to_qkv", "to_kv"):
                if name in module._modules:
                    del module._modules[name]
            if getattr(module, "fused_projections", False):
                module.fused_projections = False


@contextmanager
def _channels_last(unet: torch.nn.Module) -> Iterator[None]:
    unet.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        unet.to(memory_format=torch.contiguous_format)
