"""FreeU and FreeU_V2: ComfyUI 0.3.64's output_block_patch math, where it is hooked, and hooks gone after a run."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from engine.executor import Executor
from engine.models.unet_hooks import skip_splits, unet_patched
from engine.nodes.unet_patches import FreeUPatch
from tests.engine.conftest import txt2img


def comfy_fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """comfy_extras/nodes_freelunch.py Fourier_filter, compactly."""
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    b, c, h, w = x_freq.shape
    mask = torch.ones((b, c, h, w))
    mask[..., h // 2 - threshold:h // 2 + threshold, w // 2 - threshold:w // 2 + threshold] = scale
    return torch.fft.ifftn(torch.fft.ifftshift(x_freq * mask, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


def comfy_output_block_patch(model_channels: int, b1: float, b2: float, s1: float, s2: float, v2: bool) -> Any:
    """FreeU.patch / FreeU_V2.patch's output_block_patch, compactly."""
    scale_dict = {model_channels * 4: (b1, s1), model_channels * 2: (b2, s2)}

    def patch(h: torch.Tensor, hsp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scale_dict.get(int(h.shape[1]), None)
        if scale is not None:
            if v2:
                hidden_mean = h.mean(1).unsqueeze(1)
                B = hidden_mean.shape[0]  # noqa: N806
                hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
                hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
                hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (
                    hidden_max - hidden_min).unsqueeze(2).unsqueeze(3)
                h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * ((scale[0] - 1) * hidden_mean + 1)
            else:
                h[:, :h.shape[1] // 2] = h[:, :h.shape[1] // 2] * scale[0]
            hsp = comfy_fourier_filter(hsp, threshold=1, scale=scale[1])
        return h, hsp
    return patch


def comfy_output_pairs(model_channels: int, channel_mult: tuple[int, ...],
                       num_res_blocks: int) -> list[tuple[int, int]]:
    """The (h, hsp) widths openaimodel.py's UNetModel hands each output block's patch, from its channel bookkeeping."""
    chans, ch = [model_channels], model_channels
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            ch = mult * model_channels
            chans.append(ch)
        if level != len(channel_mult) - 1:
            chans.append(ch)  # the downsample's output
    pairs = []
    for mult in channel_mult[::-1]:
        for _ in range(num_res_blocks + 1):
            pairs.append((ch, chans.pop()))
            ch = model_channels * mult
    return pairs


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("width", [128, 64, 32, 96])
def test_freeu_patch_is_comfys_output_block_patch(v2: bool, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    h, hsp = torch.randn(2, width, 8, 8, generator=gen), torch.randn(2, width // 2, 8, 8, generator=gen)
    ours = FreeUPatch(1.3, 1.4, 0.9, 0.2, 32, v2)(h.clone(), hsp.clone())
    theirs = comfy_output_block_patch(32, 1.3, 1.4, 0.9, 0.2, v2)(h.clone(), hsp.clone())
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    if width not in (128, 64):  # model_channels * 4 and * 2 only
        assert torch.equal(ours[0], h) and torch.equal(ours[1], hsp)


class Recorder:
    """An output-block patch that records the widths it sees and changes nothing."""

    kind: ClassVar[str] = "output_block"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def __call__(self, h: torch.Tensor, hsp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append((h.shape[1], hsp.shape[1]))
        return h, hsp


def unet_of(executor: Executor, checkpoint: str) -> torch.nn.Module:
    return executor.models.checkpoint(checkpoint).pipe.unet


def forward(unet: torch.nn.Module, sdxl: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=gen),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.inference_mode():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=context, **extra).sample


def hook_count(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


@pytest.mark.parametrize(("checkpoint", "mult"), [("tiny-sd15.safetensors", (1, 2)), ("tiny-sdxl.safetensors", (1, 2))])
def test_the_patch_sees_the_h_and_skip_comfy_hands_each_output_block(executor: Executor, checkpoint: str,
                                                                       mult: tuple[int, ...]) -> None:
    unet = unet_of(executor, checkpoint)
    recorder = Recorder()
    with unet_patched(unet, (recorder,)):
        forward(unet, sdxl="sdxl" in checkpoint)
    channels = unet.config.block_out_channels[0]
    assert recorder.seen == comfy_output_pairs(channels, mult, unet.config.layers_per_block)
    assert [width for _, width in skip_splits(unet)] == [h for h, _ in recorder.seen]


def test_hooks_are_removed_after_the_run_and_on_errors(executor: Executor) -> None:
    unet = unet_of(executor, "tiny-sd15.safetensors")
    before, hooks = forward(unet), hook_count(unet)
    freeu = FreeUPatch(1.1, 1.2, 0.9, 0.2, 32)
    with unet_patched(unet, (freeu,)):
        patched = forward(unet)
    assert not torch.equal(patched, before)
    assert hook_count(unet) == hooks and torch.equal(forward(unet), before)  # bit for bit, unpatched again

    class Broken(Recorder):
        def __call__(self, h: torch.Tensor, hsp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            raise RuntimeError("patch failed")

    with pytest.raises(RuntimeError, match="patch failed"), unet_patched(unet, (freeu, Broken())):
        forward(unet)
    assert hook_count(unet) == hooks and torch.equal(forward(unet), before)


def test_two_patches_compose_in_order(executor: Executor) -> None:
    unet = unet_of(executor, "tiny-sd15.safetensors")
    first, second = FreeUPatch(1.1, 1.2, 0.9, 0.5, 32), FreeUPatch(1.0, 0.7, 1.0, 0.8, 32, v2=True)

    class Both:
        kind: ClassVar[str] = "output_block"

        def __call__(self, h: torch.Tensor, hsp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return second(*first(h, hsp))

    with unet_patched(unet, (first, second)):
        chained = forward(unet)
    with unet_patched(unet, (Both(),)):
        by_hand = forward(unet)
    assert torch.equal(chained, by_hand)


def with_freeu(workflow: dict[str, Any], node: str = "FreeU", **values: float) -> dict[str, Any]:
    changed = copy.deepcopy(workflow)
    changed["20"] = {"class_type": node, "inputs": {"model": ["4", 0], **values}}
    changed["3"]["inputs"]["model"] = ["20", 0]
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


@pytest.mark.parametrize("node", ["FreeU", "FreeU_V2"])
def test_a_freeu_workflow_draws_its_own_picture_and_a_plain_one_after_it_draws_the_plain(executor: Executor,
                                                                                         node: str) -> None:
    plain = txt2img(seed=1501)
    before = pixels(executor, plain)
    patched = pixels(executor, with_freeu(plain, node, b1=1.5, b2=1.6, s1=0.5, s2=0.5))
    executor.cache.clear()  # the plain sampler runs again, on the UNet the FreeU run hooked
    after = pixels(executor, plain)
    assert np.array_equal(before, after)
    assert np.abs(patched - before).max() > 0


def test_freeu_defaults_and_ranges_are_comfys(executor: Executor) -> None:
    from engine.nodes import catalog

    specs = {node: {s.name: (s.default, s.min, s.max) for s in catalog()[node].input_specs()}
             for node in ("FreeU", "FreeU_V2")}
    assert specs["FreeU"] == {"model": (None, None, None), "b1": (1.1, 0, 10), "b2": (1.2, 0, 10),
                              "s1": (0.9, 0, 10), "s2": (0.2, 0, 10)}
    assert specs["FreeU_V2"]["b1"] == (1.3, 0, 10) and specs["FreeU_V2"]["b2"] == (1.4, 0, 10)
    assert catalog()["FreeU"].CATEGORY == "model_patches/unet"
