"""The input folder as COMBO inputs list it: its images for LoadImage ("input"), its .latent files for LoadLatent
("input_latents"), as ComfyUI's two listings of the one folder. Below the nodes, the model manager and validation,
which all read it (no imports: the node base and validation stay free of torch)."""

from __future__ import annotations

__all__ = ["INPUT_FOLDERS", "LATENT_SUFFIXES"]

INPUT_FOLDERS = ("input", "input_latents")
# LoadLatent's files; a latent ComfyUI saved may also be a .safetensors
LATENT_SUFFIXES = (".latent", ".safetensors")
