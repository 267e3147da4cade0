"""ComfyUI's k-diffusion samplers written for Noodle, one module per family (base.py: the contract).

Importing the package registers every family's samplers in `KDIFFUSION`.
"""

from engine.samplers.kdiffusion import ancestral  # noqa: F401  (registers its samplers)
from engine.samplers.kdiffusion.base import KDIFFUSION, Denoiser, KDiffSampler, Run

__all__ = ["KDIFFUSION", "Denoiser", "KDiffSampler", "Run"]
