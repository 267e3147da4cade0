"""ComfyUI's k-diffusion samplers written for Noodle, one module per family (base.py: the contract).

Importing the package registers every family's samplers in `KDIFFUSION`.
"""

from engine.samplers.kdiffusion import ancestral  # noqa: F401  (registers its samplers)
from engine.samplers.kdiffusion import sde  # noqa: F401
from engine.samplers.kdiffusion import ipndm  # noqa: F401
from engine.samplers.kdiffusion import deis  # noqa: F401
from engine.samplers.kdiffusion import res_multistep  # noqa: F401
from engine.samplers.kdiffusion import gradient_estimation  # noqa: F401
from engine.samplers.kdiffusion import lcm_ddpm  # noqa: F401
from engine.samplers.kdiffusion import cfg_pp  # noqa: F401
from engine.samplers.kdiffusion import er_sde  # noqa: F401
from engine.samplers.kdiffusion import seeds  # noqa: F401
from engine.samplers.kdiffusion import sa_solver  # noqa: F401
from engine.samplers.kdiffusion import dpm_solver, heunpp2, lms  # noqa: F401
from engine.samplers.kdiffusion.base import KDIFFUSION, Denoiser, KDiffSampler, Run

__all__ = ["KDIFFUSION", "Denoiser", "KDiffSampler", "Run"]
