"""Tiny real CLIP text models (random weights, real vocabulary) and an embeddings folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from prompts import EmbeddingLibrary, clip_tokenizer

# Widths differ on purpose: SDXL's encoders are told apart by width (DESIGN), so clip_l-like is
# 32 wide and clip_g-like 64 wide.
L_WIDTH = 32
G_WIDTH = 64
G_PROJECTION = 48


def _config(width: int, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=37, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, **extra)


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()


@pytest.fixture(scope="session")
def sd1_model() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(_config(L_WIDTH)).eval()


@pytest.fixture(scope="session")
def sdxl_models() -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(0)
    clip_l = CLIPTextModel(_config(L_WIDTH)).eval()
    clip_g = CLIPTextModelWithProjection(_config(G_WIDTH, projection_dim=G_PROJECTION)).eval()
    return clip_l, clip_g


@pytest.fixture
def embedding_folder(tmp_path: Path) -> Path:
    """One file per supported layout, plus a pickle and a broken file (never loaded)."""
    torch.manual_seed(1)
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, L_WIDTH)}, folder / "sd1style.safetensors")
    save_file({"string_to_param.*": torch.randn(3, L_WIDTH)}, folder / "oldstyle.safetensors")
    save_file({"clip_l": torch.randn(2, L_WIDTH), "clip_g": torch.randn(2, G_WIDTH)}, folder / "xlstyle.safetensors")
    save_file({"<toy>": torch.randn(L_WIDTH)}, folder / "sub" / "concept.safetensors")
    (folder / "evil.pt").write_bytes(b"\x80\x04 not really a pickle, never opened")
    (folder / "broken.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    return folder


@pytest.fixture
def library(embedding_folder: Path) -> EmbeddingLibrary:
    return EmbeddingLibrary(embedding_folder)
