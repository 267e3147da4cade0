"""The guided noise prediction every sampler step calls, as ComfyUI's `calc_cond_batch` and `cfg_function`:
positive and negative conds in one UNet batch per shape they see (each within its timestep window; an area cond
sees its crop and counts with its weight, engine/nodes/area_conditioning.py), ControlNet residuals per cond, a
cond's GLIGEN text boxes through gated layers hooked in for the call (engine/models/gligen.py),
an inpainting UNet's [mask, masked latent] concat or an InstructPix2Pix one's source image
(engine/nodes/unet_concat.py), the model's own prediction type turned into eps, then
classifier-free guidance `uncond + (cond - uncond) * cfg`, or the MODEL's CFG hooks (RescaleCFG, SAG, PAG:
engine/nodes/cfg_hooks.py) and a DualCFGGuider's combine (engine/nodes/dual_cfg.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

import engine.nodes.area_conditioning as areas
from engine import samplers
from engine.models.controlnet.residuals import ControlResiduals
from engine.models.detect import INPAINT_CHANNELS, IP2P_CHANNELS
from engine.models.gligen import GligenInputs, gligen_fused
import engine.nodes.cfg_hooks as cfg_hooks
from engine.nodes.attention_replace import Attn1Slot
from engine.nodes.gligen import spread_to_negative
from engine.nodes.unet_concat import InpaintSource, group_concats, ip2p_scale
from engine.values import CondItem, Conditioning, DualCFG, ModelPatches

__all__ = ["EpsFn", "InpaintSource", "guided_eps"]

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _repeat_to(embeds: torch.Tensor, length: int) -> torch.Tensor:
    # ComfyUI batches conds of different lengths by repeating each to a common multiple: attention
    # over k copies of the same keys gives the same result as over one copy
    return embeds.repeat(1, length // embeds.shape[1], 1)


def _time_ids(item: CondItem, height: int, width: int) -> list[float]:
    # a cond's extras may also hold InpaintModelConditioning's concat_latent_image and concat_mask (or
    # InstructPixToPixConditioning's image): they are for inpainting (InstructPix2Pix) UNets, and a 4-channel one
    # has nothing to concatenate them to and never reads them (ComfyUI's concat_keys are empty there)
    extras = item.extras
    h, w = extras.get("height", height), extras.get("width", width)
    return [h, w, extras.get("crop_h", 0), extras.get("crop_w", 0),
            extras.get("target_height", h), extras.get("target_width", w)]


def _pooled(item: CondItem, seed: int, unet: torch.nn.Module) -> torch.Tensor:
    # SDXL's pooled text embedding, or an unCLIPConditioning's image embeds in its place (a revision, with `seed`
    # the sampler's: engine/nodes/clip_vision.py); its width is what the UNet's add embedding takes beside time_ids
    from engine.nodes.clip_vision import sdxl_pooled

    config = getattr(unet, "config", None)
    width = (config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
             if getattr(config, "projection_class_embeddings_input_dim", None) else 1280)
    pooled = sdxl_pooled(item, seed, width)
    return pooled if pooled is not None else torch.zeros(1, width)


def guided_eps(unet: torch.nn.Module, positive: Conditioning | Sequence[Conditioning],
               negative: Conditioning | Sequence[Conditioning], cfg: float, sdxl: bool, pixel_size: tuple[int, int],
               sizes: Sequence[int] | None = None, inpaint: InpaintSource | None = None,
               sampling: samplers.ModelSampling = samplers.DEFAULT_SAMPLING, family: str | None = None,
               patches: ModelPatches | None = None, dual: DualCFG | None = None,
               disable_cfg1_optimization: bool = False, attention: Attn1Slot | None = None,
               seed: int | Sequence[int] = 0, forward: Callable[..., Any] | None = None) -> EpsFn:
    """The guided noise prediction for a batch of latents at one sigma.

    One Conditioning pair guides the whole batch, as a KSampler does. With per-item sequences (the
    queue's batches of several jobs) pair g guides the next `sizes[g]` latents, all in one UNet call.
    An inpainting (9-channel) UNet gets each cond's `inpaint_concat` after the latent's 4 channels, an
    InstructPix2Pix (8-channel) one its `ip2p_concat`.
    `sampling` (the MODEL's ModelSampling) turns each cond's output into the noise prediction that gives
    ComfyUI's denoised estimate (v-prediction, LCM, x0), before CFG combines them as ComfyUI combines denoised ones.
    `family` (the MODEL's Arch.family; without it "sdxl" or "sd15" from `sdxl`) is what a ControlNet must fit,
    and its start/end percents are read on `sampling`'s sigmas. So are a cond's ConditioningSetTimestepRange
    ("start_percent" / "end_percent" in its extras): outside its range a cond (and its ControlNet) is left out of
    the UNet batch, and a side with no active cond predicts a denoised estimate of 0, as ComfyUI's calc_cond_batch.
    Area conds (ConditioningSetArea, ...Percentage, ...Strength, ConditioningSetMask) are resolved on the latent
    of `pixel_size`, get their twins on the other side, run on their crops and are averaged with their weights
    (engine/nodes/area_conditioning.py).

    `patches` (the MODEL's) with CFG hooks (RescaleCFG, SelfAttentionGuidance, PerturbedAttentionGuidance) combine
    the sides in denoised space as ComfyUI's cfg_function (engine/nodes/cfg_hooks.py); `dual` makes it a
    DualCFGGuider's prediction (engine/nodes/dual_cfg.py). The returned function also has `with_uncond(x, timestep,
    sigma) -> (eps, uncond eps)`, which always runs the uncond pass (ComfyUI's disable_cfg1_optimization, as
    `disable_cfg1_optimization` does for every call), and `sides` (cfg_hooks.SidesFn). `attention` is the run's
    attn1 replacements when a caller shares one between predictions (a DualCFGGuider's). `seed` is the sampler's
    noise seed, which seeds an SDXL revision's (unCLIPConditioning's) noise augmentation as in ComfyUI (one per
    group with `sizes`: each job's own). `forward` is the UNet's compiled call ([engine] compile,
    engine/models/compiled.py), used where nothing hooks the UNet for the call (GLIGEN boxes need it eager).
    """
    if dual is not None:
        from engine.nodes.dual_cfg import dual_eps

        def build(pos: Conditioning, neg: Conditioning, keep_negative: bool, slot: Attn1Slot | None) -> EpsFn:
            return guided_eps(unet, pos, neg, 1.0, sdxl, pixel_size, sizes, inpaint, sampling, family,
                              disable_cfg1_optimization=keep_negative, attention=slot, seed=seed, forward=forward)

        return dual_eps(build, positive, negative, cfg, dual, patches or ModelPatches(), disable_cfg1_optimization)
    positives = [positive] if isinstance(positive, Conditioning) else list(positive)
    negatives = [negative] if isinstance(negative, Conditioning) else list(negative)
    groups_wanted = 1 if sizes is None else len(sizes)
    if len(positives) != groups_wanted or len(negatives) != groups_wanted:
        raise ValueError(f"{len(positives)} positive and {len(negatives)} negative conds for {groups_wanted} "
                         "group(s) of latents: give one pair per group, with `sizes` for more than one")
    # ComfyUI's process_conds: an area cond gets a twin on the other side (cfg 1 too), then the legacy
    # ControlNetApply's ControlNet reaches the negative's conds without an area, at sampling time
    cells = (pixel_size[0] // 8, pixel_size[1] // 8)  # the latent being sampled, which areas are resolved on
    pairs = [areas.with_opposite_areas(p, n, *cells) for p, n in zip(positives, negatives)]
    positives = [p for p, _ in pairs]
    negatives = [areas.spread_outside_areas(p, n) for p, n in pairs]
    # then the positive's GLIGEN boxes reach the negative's conds without an area (engine/nodes/gligen.py)
    negatives = [spread_to_negative(p, n) for p, n in zip(positives, negatives)]
    # cfg 1 needs no negative pass: ComfyUI skips it too, and the result is the same (unless a hook reads it)
    keep_negative = disable_cfg1_optimization or (patches is not None and patches.disable_cfg1_optimization)
    skip_negative = math.isclose(cfg, 1.0) and not keep_negative
    groups = [list(p.items) + ([] if skip_negative else list(n.items)) for p, n in zip(positives, negatives)]
    n_pos = [len(p.items) for p in positives]
    length = math.lcm(*(item.embeds.shape[1] for items in groups for item in items))
    device, dtype = unet.device, unet.dtype
    contexts = [torch.cat([_repeat_to(item.embeds, length) for item in items]).to(device, dtype) for items in groups]
    added: list[dict[str, torch.Tensor]] | None = None
    if sdxl:
        seeds = [seed] * len(groups) if isinstance(seed, int) else list(seed)
        added = [{
            "text_embeds": torch.cat([_pooled(item, group_seed, unet) for item in items]).to(device, dtype),
            "time_ids": torch.tensor([_time_ids(item, *pixel_size) for item in items], device=device, dtype=dtype),
        } for items, group_seed in zip(groups, seeds)]
    fits = family or ("sdxl" if sdxl else "sd15")
    # None without ControlNets: the UNet call as before; one per set of active conds (timestep ranges)
    controls = {None: ControlResiduals.for_groups(groups, unet, fits, sampling)}
    in_channels = getattr(getattr(unet, "config", None), "in_channels", 4)
    concatenates = in_channels in (INPAINT_CHANNELS, IP2P_CHANNELS)
    # for an InstructPix2Pix UNet: the factor its source latent is concatenated with
    edit_scale = ip2p_scale(sdxl, sampling) if in_channels == IP2P_CHANNELS else None
    concats: dict[tuple[Any, ...], torch.Tensor] = {}  # the concat is the same at every step: built once
    boxes = GligenInputs()  # so are a GLIGEN cond's grounding tokens
    windows = _timestep_windows(groups, sampling)
    everything = [list(range(len(items))) for items in groups]
    regions_for: dict[tuple[int, ...], list[list[areas.Region | None]]] = {}  # per group sizes: the same each step

    hooked = cfg_hooks.is_hooked(patches)
    if any(item.extras.get("gligen") for items in groups for item in items):
        forward = None  # its gated layers are hooked into the UNet for each call
    if attention is None and hooked:
        attention = Attn1Slot(dict(patches.attn1_replace))  # type: ignore[union-attr]

    def sides(x: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor,
              only: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per group, the (cond, uncond) noise predictions (uncond None when skipped); `only` 0 or 1: that side's
        conds alone (a hook's extra pass)."""
        counts = list(sizes) if sizes is not None else [x.shape[0]]
        chunks = x.split(counts)
        regions = _regions(x, counts)
        # the conds whose timestep range holds this sigma (None: all of them, the usual case)
        active = _active_items(windows, float(sigma))
        keep = everything if active is None else active
        if only is not None:
            keep = [[i for i in k if int(i >= n) == only] for k, n in zip(keep, n_pos)]
        run_regions = [[rs[i] for i in k] for rs, k in zip(regions, keep)]
        positives = [sum(i < n for i in k) for k, n in zip(keep, n_pos)]
        # ComfyUI calls the model only for the conds that take part, in one batch per shape of latent they see
        # (an area cond sees its crop of it)
        preds: list[dict[int, torch.Tensor]] = [{} for _ in groups]
        for picks in _by_shape(keep, regions, (x.shape[-2], x.shape[-1])):
            out, offset = _unet_call(x, timestep, sigma, chunks, counts, picks, regions), 0
            for group, (indices, batch, chunk) in enumerate(zip(picks, counts, chunks)):
                for i in indices:
                    # the eps prediction itself comes back unchanged
                    seen = areas.crop(chunk.float(), regions[group][i])
                    preds[group][i] = sampling.to_eps(out[offset:offset + batch], seen, float(sigma))
                    offset += batch
        guided = []
        for k, group_preds, group_regions, positives_in, chunk in zip(keep, preds, run_regions, positives, chunks):
            ordered = [group_preds[i] for i in k]
            cond = _side(ordered[:positives_in], group_regions[:positives_in], chunk, float(sigma))
            if skip_negative:
                guided.append((cond, None))
                continue
            uncond = _side(ordered[positives_in:], group_regions[positives_in:], chunk, float(sigma))
            guided.append((cond, uncond))
        return guided

    hooks = cfg_hooks.CfgHooks(patches, cfg, sides, attention) if hooked else None  # type: ignore[arg-type]

    def eps(x: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        pairs = sides(x, timestep, sigma)
        if hooks is not None:
            return hooks(x, timestep, sigma, pairs)[0]
        return torch.cat([cond if uncond is None else uncond + (cond - uncond) * cfg for cond, uncond in pairs])

    forced: list[EpsFn] = []  # at cfg 1: the same prediction with the uncond pass, built on first use

    def with_uncond(x: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if skip_negative:
            if not forced:
                forced.append(guided_eps(unet, positive, negative, cfg, sdxl, pixel_size, sizes, inpaint, sampling,
                                         family, patches=patches, disable_cfg1_optimization=True, seed=seed,
                                         forward=forward))
            return forced[0].with_uncond(x, timestep, sigma)  # type: ignore[attr-defined]
        pairs = sides(x, timestep, sigma)
        if hooks is not None:
            return hooks(x, timestep, sigma, pairs)
        uncond = torch.cat([u for _, u in pairs])  # type: ignore[misc]
        return torch.cat([u + (c - u) * cfg for c, u in pairs]), uncond  # type: ignore[operator]

    def _regions(x: torch.Tensor, counts: list[int]) -> list[list[areas.Region | None]]:
        """Per group, each cond item's Region on the latent (None: a plain cond), for these group sizes."""
        if tuple(counts) not in regions_for:
            found = [[areas.region(item, *cells, batch, x.device) for item in items]
                     for items, batch in zip(groups, counts)]
            if any(r is not None for rs in found for r in rs) and (x.shape[-2], x.shape[-1]) != cells:
                raise ValueError(f"latents of {x.shape[-2]}x{x.shape[-1]} cells, but guided_eps was given "
                                 f"{pixel_size} pixels: area conds are resolved on the latent being sampled")
            regions_for[tuple(counts)] = found
        return regions_for[tuple(counts)]

    def _unet_call(x: torch.Tensor, timestep: torch.Tensor, sigma: torch.Tensor, chunks: Sequence[torch.Tensor],
                   counts: list[int], picks: list[list[int]],
                   regions: list[list[areas.Region | None]]) -> torch.Tensor:
        # per group: each picked cond item over its crop of the group's latents, item-major, then all groups in one
        # batch (every pick sees the same shape)
        run_groups = [[groups[g][i] for i in indices] for g, indices in enumerate(picks)]
        run_regions = [[regions[g][i] for i in indices] for g, indices in enumerate(picks)]
        x_in = torch.cat([areas.crop(sampling.model_input(chunk, float(sigma)).to(device, dtype), r)
                          for chunk, rs in zip(chunks, run_regions) for r in rs])
        ctx_in = torch.cat([context[indices].repeat_interleave(b, dim=0)
                            for context, indices, b in zip(contexts, picks, counts)])
        kwargs: dict[str, Any] = {}
        if added is not None:
            kwargs["added_cond_kwargs"] = {key: torch.cat([a[key][indices].repeat_interleave(b, dim=0)
                                                           for a, indices, b in zip(added, picks, counts)])
                                           for key in added[0]}
        # filled on the device from the host's number: a copy of a CPU tensor there would wait for the GPU
        t = torch.full((x_in.shape[0],), float(timestep.reshape(-1)[0]), dtype=timestep.dtype, device=device)
        pattern = None if picks == everything else tuple(map(tuple, picks))
        if pattern not in controls:
            controls[pattern] = ControlResiduals.for_groups(run_groups, unet, fits, sampling)
        control = controls[pattern]
        if control is not None:  # on the crop an area cond sees, its hint resized to that crop, as in ComfyUI
            kwargs.update(control(x_in, t, sigma, ctx_in, kwargs.get("added_cond_kwargs"), counts))
        if concatenates:  # after the ControlNet, which sees only the latent's 4 channels, as in ComfyUI
            key = (tuple(x.shape), pattern)
            if key not in concats:
                concats[key] = group_concats(run_groups, counts, x, inpaint, run_regions,
                                              edit_scale).to(device, dtype)
            x_in = torch.cat([x_in, concats[key]], dim=1)
        def call() -> torch.Tensor:
            # each cond's GLIGEN gated layers on its rows, hooked for this call only (engine/models/gligen.py)
            with gligen_fused(unet, [(g_item.extras.get("gligen"), b) for g_items, b in zip(run_groups, counts)
                                     for g_item in g_items], x_in.shape, boxes):
                return (forward or unet)(x_in, t, encoder_hidden_states=ctx_in, **kwargs).sample

        if attention is None:
            return call().float().to(x.device)
        # the run's attn1 replacements (SAG's capture, PAG's pass) on the middle block, for this call only
        items = [(g, i) for g, indices in enumerate(picks) for i in indices]
        out = attention.run(unet, call, [int(i >= n_pos[g]) for g, i in items], [counts[g] for g, _ in items],
                            [g for g, _ in items])
        return out.float().to(x.device)

    eps.with_uncond = with_uncond  # type: ignore[attr-defined]
    eps.sides = sides  # type: ignore[attr-defined]
    return eps


def _by_shape(keep: Sequence[Sequence[int]], regions: Sequence[Sequence[areas.Region | None]],
              whole: tuple[int, int]) -> list[list[list[int]]]:
    """One step's UNet calls: for each shape of latent the active conds see (the whole, or an area's crop), per
    group the indices of its items of that shape, in order. ComfyUI batches only conds of one shape too."""
    calls: dict[tuple[int, int], list[list[int]]] = {}
    for group, indices in enumerate(keep):
        for i in indices:
            r = regions[group][i]
            shape = whole if r is None or r.box is None else (r.box[0], r.box[1])
            calls.setdefault(shape, [[] for _ in keep])[group].append(i)
    return list(calls.values())


def _side(preds: Sequence[torch.Tensor], regions: Sequence[areas.Region | None], chunk: torch.Tensor,
          sigma: float) -> torch.Tensor:
    """One side's noise prediction (calc_cond_batch's out_cond / out_count): its active conds' predictions weighed
    by their regions (plain conds: the mean). Where none counts, ComfyUI's prediction is a denoised estimate of 0
    (an empty sum over its 1e-37 count)."""
    if not preds:
        return _no_cond_eps(chunk, sigma)
    return areas.weighted_mean(preds, regions, lambda: _no_cond_eps(chunk, sigma))


def _timestep_windows(groups: Sequence[Sequence[CondItem]],
                      sampling: samplers.ModelSampling) -> list[list[tuple[float | None, float | None]]] | None:
    """Per cond item, its ConditioningSetTimestepRange as (start sigma, end sigma) on the model's own sampling, as
    ComfyUI's calculate_start_end_timesteps converts "start_percent" / "end_percent"; None where no cond has one."""
    if not any("start_percent" in item.extras or "end_percent" in item.extras for items in groups for item in items):
        return None

    def sigma_of(item: CondItem, key: str) -> float | None:
        return None if key not in item.extras else samplers.percent_to_sigma(float(item.extras[key]), sampling)

    return [[(sigma_of(item, "start_percent"), sigma_of(item, "end_percent")) for item in items] for items in groups]


def _active_items(windows: list[list[tuple[float | None, float | None]]] | None,
                  sigma: float) -> list[list[int]] | None:
    """Per group, the indices of the cond items active at `sigma` (ComfyUI's get_area_and_mult skips a cond when
    sigma > its start sigma or sigma < its end sigma); None when every item is active."""
    if windows is None:
        return None
    active = [[i for i, (start, end) in enumerate(items)
               if not ((start is not None and sigma > start) or (end is not None and sigma < end))]
              for items in windows]
    if all(len(keep) == len(items) for keep, items in zip(active, windows)):
        return None
    return active


def _no_cond_eps(scaled: torch.Tensor, sigma: float) -> torch.Tensor:
    """The noise prediction whose denoised estimate x - sigma * eps is 0, for latents `scaled` = x / sqrt(sigma^2 + 1)
    (what ComfyUI predicts for a side none of whose conds is active)."""
    return scaled.float() * (math.sqrt(sigma**2 + 1.0) / sigma)
