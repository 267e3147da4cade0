"""ComfyUI's samplers on diffusers: the names, ComfyUI's sigma schedules, and the sampling loop.

A KSampler node asks, in this order: names.py (is the sampler/scheduler a ComfyUI one Noodle runs, and on
which diffusers scheduler), sigmas.py (ComfyUI's exact sigmas for the steps and denoise), plan.py (a
diffusers scheduler set to step through them, or a refusal) and loop.py (`sample`, the denoising loop
around the model's CFG'd noise prediction). The math is ComfyUI 0.3.64's: comfy/samplers.py,
model_sampling.py, k_diffusion/sampling.py and extra_samplers/uni_pc.py. model_sampling.py holds a MODEL's
prediction type and sigma table (ModelSamplingDiscrete: eps, v_prediction, lcm, x0; zsnr).
"""

from engine.samplers.loop import EpsFn, noise_scaling, sample, scale_model_input
from engine.samplers.model_sampling import DEFAULT_SAMPLING, PREDICTIONS, ModelSampling, percent_to_sigma
from engine.samplers.names import (DETERMINISTIC_SAMPLERS, SAMPLER_NAMES, SCHEDULER_NAMES, SUPPORTED_SAMPLERS,
                                   UnfaithfulSampler, is_deterministic, uses_kdiffusion)
from engine.samplers.plan import SamplerPlan, build_scheduler, check_pair, supported_schedulers
from engine.samplers.sigmas import (MAX_SCHEDULE_STEPS, advanced_sigmas, comfy_sigmas, ksampler_sigmas, model_sigmas,
                                    schedule_problem, timestep_for_sigma)

__all__ = ["DEFAULT_SAMPLING", "DETERMINISTIC_SAMPLERS", "MAX_SCHEDULE_STEPS", "PREDICTIONS", "SAMPLER_NAMES",
           "SCHEDULER_NAMES", "SUPPORTED_SAMPLERS", "EpsFn", "ModelSampling", "SamplerPlan", "UnfaithfulSampler",
           "advanced_sigmas", "build_scheduler", "check_pair", "comfy_sigmas", "ksampler_sigmas", "model_sigmas",
           "noise_scaling", "percent_to_sigma", "sample", "scale_model_input", "schedule_problem",
           "supported_schedulers", "timestep_for_sigma", "is_deterministic", "uses_kdiffusion"]
