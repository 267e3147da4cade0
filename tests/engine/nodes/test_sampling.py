"""KSampler's pieces: ComfyUI's initial noise, and the guided prediction's batching of conds."""

from __future__ import annotations

import torch

from engine.nodes.guidance import guided_eps
from engine.nodes.sampling import prepare_noise
from engine.values import CondItem, Conditioning


def test_noise_is_comfyuis_for_the_whole_batch() -> None:
    latent = torch.zeros(3, 4, 8, 8)
    for seed in (0, 42, 2**64 - 1):
        torch.manual_seed(seed)  # what comfy/sample.py prepare_noise does
        expected = torch.randn(latent.shape)
        assert torch.equal(prepare_noise(latent, seed), expected)


def test_batch_index_keeps_each_items_noise() -> None:
    latent = torch.zeros(4, 4, 8, 8)
    whole = prepare_noise(latent, 7)
    picked = prepare_noise(torch.zeros(2, 4, 8, 8), 7, batch_index=(1, 3))
    assert torch.equal(picked, whole[[1, 3]])


class RecordingUNet(torch.nn.Module):
    """Returns the mean of the context per item, so the guidance arithmetic can be checked by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.dtype = torch.device("cpu"), torch.float32  # as diffusers models expose them

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object):
        value = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(x)
        return type("Out", (), {"sample": value})()


def cond(value: float, tokens: int = 77) -> Conditioning:
    return Conditioning((CondItem(torch.full((1, tokens, 8), value)),))


def test_cfg_mixes_cond_and_uncond_and_conds_of_other_lengths_batch_together() -> None:
    unet = RecordingUNet()
    eps = guided_eps(unet, cond(2.0, tokens=154), cond(0.5), cfg=3.0, sdxl=False, pixel_size=(64, 64))
    out = eps(torch.zeros(2, 4, 8, 8), torch.tensor(500), torch.tensor(1.0))
    assert torch.allclose(out, torch.full_like(out, 0.5 + (2.0 - 0.5) * 3.0))


def test_cfg_one_skips_the_negative_pass() -> None:
    eps = guided_eps(RecordingUNet(), cond(2.0), cond(float("nan")), cfg=1.0, sdxl=False, pixel_size=(64, 64))
    assert torch.equal(eps(torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.tensor(1.0)), torch.full((1, 4, 8, 8), 2.0))
