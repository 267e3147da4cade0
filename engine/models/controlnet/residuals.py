"""What the ControlNets on a batch's conds add to the UNet at one model call, as comfy/controlnet.py computes it.

Each cond item may carry a chain of ControlHints (extras["control"], newest first, `previous` older). At a
model call with noise level sigma, every hint whose start/end percent window holds sigma (the percents read on
the model's own sigma table, as its ModelSamplingDiscrete.percent_to_sigma) runs its ControlNet on
the rows of the batch that item guides: the UNet's own input (x / sqrt(sigma^2 + 1)), timestep, text context and
SDXL size embeddings, with the hint image resized to the latent's size x8 ("nearest-exact" after a center crop,
ComfyUI's common_upscale). Its outputs (a shuffle ControlNet's averaged over the picture) times the strength are
summed along the chain, oldest first, and go to the UNet as down_block_additional_residuals and
mid_block_additional_residual; rows without control get zeros, which leave them exactly as they were. A call
where no hint is active passes nothing, so strength 0 (the apply nodes return the cond untouched) and a window
that excludes every step give exactly the picture without ControlNet. A ControlNet of another family than the
model's (SD1.x on SD2.x, SDXL on SD1.x, ...) is refused before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import UnsupportedModel
from engine.samplers.model_sampling import DEFAULT_SAMPLING, ModelSampling, percent_to_sigma
from engine.values import CondItem, Conditioning, ControlHint

__all__ = ["ControlResiduals", "chain_of", "hint_to_size", "percent_to_sigma", "spread_to_uncond"]

_FAMILY_LABELS = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}  # Arch.family -> the name in messages


def hint_to_size(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.common_upscale(image, width, height, "nearest-exact", "center") for [B, C, H, W]."""
    old_h, old_w = image.shape[-2], image.shape[-1]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    cropped = image.narrow(-2, y, old_h - 2 * y).narrow(-1, x, old_w - 2 * x)
    return F.interpolate(cropped, size=(height, width), mode="nearest-exact")


def chain_of(item: CondItem) -> list[ControlHint]:
    """The ControlHints on a cond item, oldest first (the order ComfyUI's control_merge sums them in)."""
    chain: list[ControlHint] = []
    link = item.extras.get("control")
    while link is not None:
        chain.append(link)
        link = link.previous
    return chain[::-1]


def spread_to_uncond(positive: Conditioning, negative: Conditioning) -> Conditioning:
    """The negative conds as ComfyUI samples them after ControlNetApply (the legacy node, which sets
    control_apply_to_uncond): when no negative cond has a ControlNet of its own, positive cond x's ControlNet
    goes to negative cond x % n (apply_empty_x_to_equal_area; a later one replaces an earlier one there)."""
    controls = [item.extras["control"] for item in positive.items
                if item.extras.get("control_apply_to_uncond") and item.extras.get("control") is not None]
    if not controls or any(item.extras.get("control") is not None for item in negative.items) or not negative.items:
        return negative
    items = list(negative.items)
    for x, control in enumerate(controls):
        original = negative.items[x % len(items)]
        items[x % len(items)] = CondItem(original.embeds, original.pooled, {**original.extras, "control": control},
                                         original.report)
    return Conditioning(tuple(items))


class ControlResiduals:
    """The ControlNet residuals for the rows of one guided batch; see the module docstring."""

    def __init__(self, groups: Sequence[Sequence[CondItem]], unet: torch.nn.Module, family: str,
                 sampling: ModelSampling = DEFAULT_SAMPLING) -> None:
        """`family` is the model's architecture family (Arch.family: "sd15", "sd2" or "sdxl"), which every
        ControlNet must share; `sampling` its ModelSampling, whose sigmas the start/end windows are read on."""
        self.chains = [[chain_of(item) for item in items] for items in groups]
        widths = list(unet.config.block_out_channels)
        self.windows: dict[int, tuple[float, float]] = {}
        for chains in self.chains:
            for chain in chains:
                for link in chain:
                    net = link.control_net
                    if net.family != family or list(net.module.config.block_out_channels) != widths:
                        raise UnsupportedModel(
                            f"ControlNet {net.name!r} is for {_FAMILY_LABELS.get(net.family, net.family)}"
                            f"{' (tiny)' if net.tiny else ''} UNets with block widths "
                            f"{list(net.module.config.block_out_channels)}, and this model is "
                            f"{_FAMILY_LABELS.get(family, family)} with {widths}; use a ControlNet made for the "
                            "checkpoint")
                    self.windows[id(link)] = (percent_to_sigma(link.start_percent, sampling),
                                              percent_to_sigma(link.end_percent, sampling))
        self._hints: dict[tuple[int, int, int], torch.Tensor] = {}
        self._rows: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_groups(cls, groups: Sequence[Sequence[CondItem]], unet: torch.nn.Module, family: str,
                   sampling: ModelSampling = DEFAULT_SAMPLING) -> ControlResiduals | None:
        """The residual maker for a batch's cond groups, or None when no cond carries a ControlNet."""
        if not any(item.extras.get("control") is not None for items in groups for item in items):
            return None
        return cls(groups, unet, family, sampling)

    def _hint(self, link: ControlHint, height: int, width: int, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
        key = (id(link), height, width)
        if key not in self._hints:  # ComfyUI resizes once per size and keeps it for the run
            self._hints[key] = hint_to_size(link.image.float(), width, height).to(device, dtype)
        return self._hints[key]

    def _row_indices(self, link: ControlHint, rows: list[tuple[int, int]], hint_batch: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rows a link runs on and the hint row each takes, made on the device once per pattern: a
        fresh index tensor every step would be a copy from the host that waits for the GPU."""
        key = (id(link), tuple(rows), hint_batch, device)
        if key not in self._rows:
            # ComfyUI's broadcast_image_to: row j of a batch takes hint j mod the hint's batch size
            self._rows[key] = (torch.tensor([r for r, _ in rows], device=device),
                               torch.tensor([j % hint_batch for _, j in rows], device=device))
        return self._rows[key]

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, sigma: float | torch.Tensor, context: torch.Tensor,
                 added: dict[str, torch.Tensor] | None, counts: Sequence[int]) -> dict[str, Any]:
        """UNet keyword arguments for this call: the summed residuals, or {} when no ControlNet is active."""
        s = float(sigma)
        # rows per link, in an order where a link's older links come first, with each row's index in its batch
        order: list[ControlHint] = []
        rows: dict[int, list[tuple[int, int]]] = {}
        offset = 0
        for chains, batch in zip(self.chains, counts):
            for chain in chains:
                for link in chain:
                    start, end = self.windows[id(link)]
                    if s > start or s < end:  # ComfyUI: t > timestep_range[0] or t < timestep_range[1] skips it
                        continue
                    if id(link) not in rows:
                        order.append(link)
                        rows[id(link)] = []
                    rows[id(link)] += [(offset + j, j) for j in range(batch)]
                offset += batch
        if not order:
            return {}
        height, width = x_in.shape[-2] * 8, x_in.shape[-1] * 8
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for link in order:
            net = link.control_net.module
            hint = self._hint(link, height, width, net.dtype, x_in.device)
            index, hint_index = self._row_indices(link, rows[id(link)], hint.shape[0], x_in.device)
            hint_rows = hint[hint_index]
            kwargs: dict[str, Any] = {}
            if added is not None:
                kwargs["added_cond_kwargs"] = {key: value[index].to(net.dtype) for key, value in added.items()}
            # the noisy latent only: an inpainting UNet's concatenated mask and image (after it) are not the
            # ControlNet's, which ComfyUI hands x_noisy
            x_rows = x_in[index, : net.config.in_channels].to(net.dtype)
            out_down, out_mid = net(x_rows, t[index], encoder_hidden_states=context[index].to(net.dtype),
                                    controlnet_cond=hint_rows, return_dict=False, **kwargs)
            # control_merge: a shuffle ControlNet's outputs averaged over the picture, then times the strength
            outputs = [*out_down, out_mid]
            if link.control_net.global_average_pooling:
                outputs = [o.mean(dim=(2, 3), keepdim=True).repeat(1, 1, o.shape[2], o.shape[3]) for o in outputs]
            *out_down, out_mid = [o * float(link.strength) for o in outputs]
            if down is None or mid is None:
                down = [torch.zeros((x_in.shape[0], *r.shape[1:]), device=x_in.device, dtype=x_in.dtype)
                        for r in out_down]
                mid = torch.zeros((x_in.shape[0], *out_mid.shape[1:]), device=x_in.device, dtype=x_in.dtype)
            for total, part in zip(down, out_down):
                total.index_add_(0, index, part.to(total.dtype))
            mid.index_add_(0, index, out_mid.to(mid.dtype))
        return {"down_block_additional_residuals": tuple(down or ()), "mid_block_additional_residual": mid}
