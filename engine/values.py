"""The values that travel along a workflow's links: frozen dataclasses, one per ComfyUI type.

MODEL -> ModelRef, CLIP -> ClipRef, VAE -> VaeRef, CONDITIONING -> Conditioning,
LATENT -> Latent, IMAGE -> ImageBatch, MASK -> Mask, CONTROL_NET -> ControlNetRef (a cond item's
extras["control"] holds its ControlHint chain), SIGMAS -> Sigmas, SAMPLER -> Sampler, NOISE -> Noise,
GUIDER -> Guider, CLIP_VISION -> ClipVisionRef, CLIP_VISION_OUTPUT -> ClipVisionOutput,
GLIGEN -> GligenRef (a cond item's extras["gligen"] holds its text boxes). A value never changes once made:
a LoraLoader returns a new ModelRef naming its patches;
the model manager applies them to the shared modules right before they run (ComfyUI's ModelPatcher idea,
done with peft adapters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DiffusionPipeline

    from engine.models.detect import Arch
    from engine.models.checkpoint import LoadedCheckpoint
    from engine.samplers.model_sampling import ModelSampling
    from prompts.report import TokenReport


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA file applied at one strength."""

    name: str
    strength: float


@dataclass(frozen=True)
class ModelRef:
    """A diffusion model (UNet) as a node sees it: which pipeline holds it, which LoRAs apply, how it samples."""

    checkpoint: LoadedCheckpoint
    pipe: DiffusionPipeline
    loras: tuple[LoraPatch, ...] = ()
    # How the model was made, for metadata: the checkpoint name or e.g. "merge(a, b, 0.5)".
    label: str = ""
    # ModelSamplingDiscrete's override (prediction type, zsnr); None: the checkpoint's own (arch.sampling)
    sampling: ModelSampling | None = None
    # What model patch nodes (RescaleCFG, FreeU, PAG, ...) added: applied while this MODEL samples, never a reload
    patches: ModelPatches = field(default_factory=lambda: ModelPatches())

    @property
    def arch(self) -> Arch:
        return self.checkpoint.arch

    @property
    def model_sampling(self) -> ModelSampling:
        """The prediction type and sigma table the sampler uses: the override, else the checkpoint's."""
        return self.sampling if self.sampling is not None else self.checkpoint.arch.sampling

    def with_lora(self, patch: LoraPatch) -> ModelRef:
        return ModelRef(self.checkpoint, self.pipe, (*self.loras, patch), self.label, self.sampling, self.patches)

    def with_sampling(self, sampling: ModelSampling) -> ModelRef:
        return ModelRef(self.checkpoint, self.pipe, self.loras, self.label, sampling, self.patches)

    def with_patches(self, patches: ModelPatches) -> ModelRef:
        return ModelRef(self.checkpoint, self.pipe, self.loras, self.label, self.sampling, patches)


@dataclass(frozen=True)
class ModelPatches:
    """ComfyUI's model_options on a MODEL, as patch nodes add them (each node returns a new MODEL; the shared UNet
    is only hooked while this MODEL samples). The callables are the patch nodes' own objects; their contracts are
    documented where they are used (engine/nodes/cfg_hooks.py for the CFG hooks, the UNet hooks where applied).

    cfg_function: RescaleCFG's sampler_cfg_function (one; a later node replaces it, as ComfyUI's).
    post_cfg: SelfAttentionGuidance's / PerturbedAttentionGuidance's post_cfg_function chain, in order.
    unet: UNet patches (FreeU's output-block patch, a hypernetwork's attention patch), in order; hooked into the
        shared UNet for one run by engine/models/unet_hooks.py, which says what each `kind` is called with.
    denoise_mask: DifferentialDiffusion's denoise_mask_function (one): fn(sigma, mask, sigmas, sampling) -> the
        mask a model call uses (engine/samplers/loop.py masked_eps).
    attn1_replace: ComfyUI's attn1 patches_replace, (block key, function) pairs (engine/nodes/attention_replace.py);
        a later pair for a key replaces the earlier one, as ComfyUI's dict (SelfAttentionGuidance's capture).
    disable_cfg1_optimization: cfg 1 still runs the uncond pass (SelfAttentionGuidance sets it, as in ComfyUI).
    """

    cfg_function: Any = None
    post_cfg: tuple[Any, ...] = ()
    unet: tuple[Any, ...] = ()
    denoise_mask: Any = None
    attn1_replace: tuple[tuple[tuple[Any, ...], Any], ...] = ()
    disable_cfg1_optimization: bool = False

    def replace(self, **changes: Any) -> ModelPatches:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClipRef:
    """The text encoder(s) of a checkpoint, their LoRA patches and ComfyUI's clip-skip layer."""

    checkpoint: LoadedCheckpoint
    pipe: DiffusionPipeline
    loras: tuple[LoraPatch, ...] = ()
    # CLIPSetLastLayer: -1 the last layer, -2 the penultimate; None is the model's own default
    # (SD1.x the last layer, SDXL the penultimate, as ComfyUI builds them).
    stop_at_layer: int | None = None

    @property
    def arch(self) -> Arch:
        return self.checkpoint.arch


@dataclass(frozen=True)
class VaeRef:
    """A VAE and where it came from (the checkpoint's own or a VAELoader file)."""

    vae: AutoencoderKL
    name: str
    # The loaded checkpoint this VAE lives in ("" for a VAELoader file): caches drop it with it.
    checkpoint_key: str = ""

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


@dataclass(frozen=True)
class CondItem:
    """One text encoding: token embeddings [1, 77*k, D], SDXL's pooled vector and size conditioning.

    `extras` holds ComfyUI's cond dict keys: SDXL sizes, "start_percent"/"end_percent", "control", the inpaint
    concat, and the area keys "area", "strength", "mask", "mask_strength", "set_area_to_bounds"."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    report: TokenReport | None = None


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: ComfyUI's list of conds; ConditioningCombine keeps them apart, Concat joins them."""

    items: tuple[CondItem, ...]

    def with_values(self, **values: Any) -> Conditioning:
        """node_helpers.conditioning_set_values: every cond with these keys set (a later node replaces them)."""
        return Conditioning(tuple(CondItem(item.embeds, item.pooled, {**item.extras, **values}, item.report)
                                  for item in self.items))


@dataclass(frozen=True)
class Latent:
    """LATENT: samples [B, 4, H/8, W/8] in the model's latent space (unscaled, as ComfyUI keeps them)."""

    samples: torch.Tensor
    # Which item of a bigger batch each sample was, so per-item noise stays the same (LatentFromBatch).
    batch_index: tuple[int, ...] | None = None
    # ComfyUI's "noise_mask": [B or 1, 1, h, w] in 0..1, any size (the sampler resizes it to the latent).
    # A sampler then denoises only where it is 1 and keeps the latent where it is 0.
    noise_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Sigmas:
    """SIGMAS: a noise schedule, a 1-D float32 tensor on the CPU, highest first as a sampler runs it (usually ending
    in 0; a split keeps a part). Fewer than 2 sigmas: nothing to sample, the latent comes back as it was."""

    values: torch.Tensor


@dataclass(frozen=True)
class Sampler:
    """SAMPLER: a ComfyUI sampler Noodle runs (a name in engine/samplers/names.py SUPPORTED_SAMPLERS), with the
    options a Sampler* node set (SamplerEulerAncestral's eta and s_noise, ...) as sorted (name, value) pairs;
    none: ComfyUI's defaults, as KSamplerSelect gives."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class Noise:
    """NOISE: RandomNoise's seeded initial noise (`random`), or DisableNoise's none; `seed` also seeds a sampler's
    step noise, 0 for DisableNoise as in ComfyUI."""

    seed: int
    random: bool


@dataclass(frozen=True)
class Guider:
    """GUIDER: a model and the conds that guide it, combined as `uncond + (cond - uncond) * cfg` (CFGGuider); a
    BasicGuider has no negative and cfg 1, the positive alone. A DualCFGGuider's is `dual`: positive is its cond1,
    cfg its cfg_conds."""

    model: ModelRef
    positive: Conditioning
    negative: Conditioning | None
    cfg: float
    dual: DualCFG | None = None


@dataclass(frozen=True)
class DualCFG:
    """DualCFGGuider's second cond (`middle`, its cond2) and scale, and its style: "nested" (True) or "regular"
    (engine/nodes/dual_cfg.py has the math)."""

    middle: Conditioning
    cfg_cond2_negative: float
    nested: bool


@dataclass(frozen=True)
class ImageBatch:
    """IMAGE: pixels [B, H, W, C] as float 0..1 on the CPU, as ComfyUI passes them."""

    pixels: torch.Tensor


@dataclass(frozen=True)
class Mask:
    """MASK: [B, H, W] float 0..1 on the CPU, as ComfyUI passes them; 1 is the area to change (inpaint)."""

    values: torch.Tensor


@dataclass(frozen=True, eq=False)
class ControlNetRef:
    """CONTROL_NET: a loaded ControlNet (a diffusers ControlNetModel), which UNet it fits, and its manager key."""

    module: torch.nn.Module
    name: str
    family: str  # "sd15" or "sdxl"
    tiny: bool
    # the model manager's key for the loaded weights: node caches drop this value when it is evicted
    checkpoint_key: str = ""
    # ComfyUI averages a shuffle ControlNet's outputs over the picture (files named *_shuffle, *_shuffle_fp16)
    global_average_pooling: bool = False


@dataclass(frozen=True, eq=False)
class ControlHint:
    """One ControlNet applied to a cond (a CondItem's extras["control"]), as ComfyUI's ControlNet object after
    set_cond_hint: the hint image [B, C, H, W] in 0..1, strength, the start/end percent window, and the
    ControlNet applied before it (`previous`: a stack is a chain, summed at sampling). Compared by identity,
    as ComfyUI's ControlNetApplyAdvanced shares one object between the positive and the negative."""

    control_net: ControlNetRef
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlHint | None = None


@dataclass(frozen=True, eq=False)
class GligenRef:
    """GLIGEN: a loaded GLIGEN model (engine/models/gligen.py Gligen: its gated self-attention layers and position
    net) and its file name; a cond's extras["gligen"] is ComfyUI's ("position", GligenRef, [(pooled, h, w, y, x)])."""

    module: torch.nn.Module
    name: str


@dataclass(frozen=True, eq=False)
class ClipVisionRef:
    """CLIP_VISION: a CLIP image encoder (a transformers CLIPVisionModelWithProjection) with the input size and the
    pixel mean/std its preprocessing uses (engine/models/clip_vision.py)."""

    module: torch.nn.Module
    name: str
    image_size: int = 224
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, eq=False)
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: CLIPVisionEncode's outputs with ComfyUI's names, float32 on the CPU: image_embeds
    [B, projection_dim] (what unCLIPConditioning reads), last_hidden_state and penultimate_hidden_states
    [B, tokens, width]."""

    image_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
