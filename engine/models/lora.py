"""LoRA files as peft adapters on loaded modules, switched per use without touching the base weights.

diffusers converts kohya/A1111 keys to peft and loads them (`lora_state_dict`,
`load_lora_into_unet`, `load_lora_into_text_encoder`); what it lacks is ComfyUI's model: a
LoRA set belongs to a MODEL or CLIP value, not to the pipeline, and the UNet and the text
encoders take different strengths. So adapters are loaded per module on first use and the
active set and scales are switched right before a module runs. A module keeps at most MAX_ADAPTERS, the least
recently used removed first, and a re-saved file's earlier adapter is removed when the file is next used.
"""

from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.peft_utils import delete_adapter_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from engine.errors import UnsupportedModel
from engine.models.lora_files import LoraFile
from engine.values import LoraPatch

# Adapters kept loaded per module, the least recently used removed first. Keeping a server's few favourite LoRAs
# spares reading, converting and injecting the file again at each switch, and each kept adapter costs about its
# file's size (tens to hundreds of MB for an SDXL LoRA), counted in its checkpoint's share of the model budget:
# more would only crowd checkpoints out. A job asking for more than this keeps all of its own.
MAX_ADAPTERS = 8


# an active set no job asks for: the next `_switch` sets every layer again
_STALE: tuple[tuple[str, float], ...] = (("<stale>", 0.0),)


@dataclass
class _ModuleState:
    loaded: OrderedDict[str, str] = field(default_factory=OrderedDict)  # adapter key -> file name, LRU first
    active: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ConvertedLora:
    """A LoRA file in diffusers' peft naming, with its network alphas."""

    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, Any] | None


class LoraAdapters:
    """Loads LoRAs into modules as named adapters and sets which are active at what strength."""

    def __init__(self, on_resize: Callable[[torch.nn.Module, int], None] | None = None) -> None:
        self._modules: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleState] = weakref.WeakKeyDictionary()
        self._converted: OrderedDict[tuple[str, str], ConvertedLora] = OrderedDict()
        # told (module, bytes) whenever adapters are added to or removed from a module: the model budget counts them
        self._on_resize = on_resize
        self.loads = 0
        self.switches = 0
        self.removals = 0

    def activate_unet(self, pipe: DiffusionPipeline, wanted: dict[str, float], files: dict[str, LoraFile]) -> None:
        """Make exactly `wanted` (adapter key -> strength) active on the pipeline's UNet."""
        unet = pipe.unet
        state = self._modules.setdefault(unet, _ModuleState())
        self._remove_stale(unet, state, files)
        for key in wanted:
            if key not in state.loaded:
                lora = self._convert(pipe, key, files[key])
                with _stale_on_failure(state), _shapes_checked("UNet"):
                    type(pipe).load_lora_into_unet(dict(lora.state_dict), lora.network_alphas, unet=unet,
                                                   adapter_name=key, _pipeline=pipe)
                    self._check_loaded(unet, key, "UNet")
                self._loaded(unet, state, key, files[key])
            state.loaded.move_to_end(key)
        self._remove_least_used(unet, state, wanted)
        self._switch(unet, state, wanted)

    def activate_text_encoders(self, pipe: DiffusionPipeline, wanted: dict[str, float],
                               files: dict[str, LoraFile]) -> None:
        """Make exactly `wanted` active on the pipeline's text encoder(s)."""
        for attr in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, attr, None)
            if encoder is None:
                continue
            state = self._modules.setdefault(encoder, _ModuleState())
            self._remove_stale(encoder, state, files)
            for key in wanted:
                if key not in state.loaded:
                    lora = self._convert(pipe, key, files[key])
                    # a LoRA without keys for this encoder loads nothing; it still counts as loaded
                    with _stale_on_failure(state), _shapes_checked("text encoder"), _some_layer_named("text encoder"):
                        type(pipe).load_lora_into_text_encoder(dict(lora.state_dict), lora.network_alphas,
                                                               text_encoder=encoder, prefix=attr, adapter_name=key,
                                                               _pipeline=pipe)
                    self._loaded(encoder, state, key, files[key])
                state.loaded.move_to_end(key)
            self._remove_least_used(encoder, state, wanted)
            self._switch(encoder, state, wanted)

    def _loaded(self, module: torch.nn.Module, state: _ModuleState, key: str, file: LoraFile) -> None:
        state.loaded[key] = file.name
        state.active = _STALE
        self.loads += 1
        self._resized(module, _adapter_bytes(module, key))

    def _remove_stale(self, module: torch.nn.Module, state: _ModuleState, files: dict[str, LoraFile]) -> None:
        """Remove the adapters of earlier states of the files asked for: a re-saved file gets a new key, so the
        old one is never asked for again."""
        names = {file.name for file in files.values()}
        for key, name in list(state.loaded.items()):
            if name in names and key not in files:
                self._remove(module, state, key)
                for cache_key in [k for k in self._converted if k[1] == key]:
                    del self._converted[cache_key]

    def _remove_least_used(self, module: torch.nn.Module, state: _ModuleState, wanted: dict[str, float]) -> None:
        for key in [k for k in state.loaded if k not in wanted][:max(0, len(state.loaded) - MAX_ADAPTERS)]:
            self._remove(module, state, key)

    def _remove(self, module: torch.nn.Module, state: _ModuleState, key: str) -> None:
        nbytes = _adapter_bytes(module, key)
        # on every tuner layer, and from the module's peft_config (which it deletes once empty)
        delete_adapter_layers(module, key)
        getattr(module, "peft_config", {}).pop(key, None)
        del state.loaded[key]
        state.active = _STALE  # peft made another adapter active where this one was
        self.removals += 1
        self._resized(module, -nbytes)

    def _resized(self, module: torch.nn.Module, nbytes: int) -> None:
        if nbytes and self._on_resize is not None:
            self._on_resize(module, nbytes)

    def _convert(self, pipe: DiffusionPipeline, key: str, file: LoraFile) -> ConvertedLora:
        cache_key = (type(pipe).__name__, key)
        if cache_key not in self._converted:
            try:
                state_dict, alphas = type(pipe).lora_state_dict(dict(file.state), unet_config=pipe.unet.config)
            except (ValueError, KeyError, RuntimeError, IndexError) as err:
                raise UnsupportedModel(f"this LoRA's keys are not a LoRA diffusers can read ({err})") from err
            self._converted[cache_key] = ConvertedLora(state_dict, alphas)
            while len(self._converted) > 32:
                self._converted.popitem(last=False)
        return self._converted[cache_key]

    @staticmethod
    def _check_loaded(module: torch.nn.Module, key: str, what: str) -> None:
        if not any(key in getattr(layer, "lora_A", {}) for layer in _tuner_layers(module)):
            raise UnsupportedModel(_matched_no_layer(what))

    def _switch(self, module: torch.nn.Module, state: _ModuleState, wanted: dict[str, float]) -> None:
        target = tuple(sorted(wanted.items()))
        if target == state.active:
            return
        for layer in _tuner_layers(module):
            present = [name for name in wanted if name in layer.lora_A]
            if not present:
                # no active LoRA here: peft skips the adapters, so the output is the base layer's, bit for bit
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(present)
            for name in present:
                layer.set_scale(name, wanted[name])  # scaling = strength * alpha / rank
        state.active = target
        self.switches += 1


@contextmanager
def _stale_on_failure(state: _ModuleState) -> Iterator[None]:
    """A load that raises leaves the layers' active adapters unknown: when diffusers rolls a failed load back, peft
    deletes the adapter and activates whichever adapter name sorts first, so the set `state.active` records (and
    `_switch` would skip setting again) is no longer the one the layers run."""
    try:
        yield
    except BaseException:
        state.active = _STALE
        raise


def _matched_no_layer(what: str) -> str:
    return f"the LoRA matched no layer of the {what}: it was made for another model family"


@contextmanager
def _some_layer_named(what: str) -> Iterator[None]:
    """A LoRA with keys for a text encoder that name none of its layers (made for another model, or damaged) fails
    in diffusers' get_peft_kwargs, which takes the first of the ranks it found, with a bare IndexError "list index
    out of range"; say what the UNet side says. It fails before peft injects anything: the encoder is as it was."""
    try:
        yield
    except IndexError as err:
        raise UnsupportedModel(_matched_no_layer(what)) from err


@contextmanager
def _shapes_checked(what: str) -> Iterator[None]:
    """A LoRA whose layer names exist in the module but with other shapes (an SDXL LoRA on SD1.x: both have
    down_blocks.1.attentions.0, with cross-attention keys 2048 and 768 wide) fails in torch's load_state_dict; say
    so in the user's terms.
    diffusers removes the half-loaded adapter before it raises, so the module is as it was."""
    try:
        yield
    except RuntimeError as err:
        # "size mismatch for mid_block.attentions.0.proj_in.lora_A.<adapter>.weight: copying a param ..."
        layers = sorted({match[1] for match in re.finditer(r"size mismatch for (\S+?)\.lora_[AB]\.", str(err))})
        if not layers:
            raise
        raise UnsupportedModel(f"the LoRA's layers have other shapes than the {what}'s ({len(layers)} layers, e.g. "
                               f"{layers[0]}): it was made for another model family (an SDXL LoRA on an SD1.x "
                               "checkpoint, or the other way round)") from err


def _tuner_layers(module: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _adapter_bytes(module: torch.nn.Module, key: str) -> int:
    """What adapter `key`'s weights take in `module` (peft names them `<layer>.lora_A.<key>.weight`)."""
    marker = f".{key}."
    return sum(p.numel() * p.element_size() for name, p in module.named_parameters() if marker in name)


def summed(patches: Sequence[LoraPatch], key_of: Any) -> dict[str, float]:
    """Adapter key -> total strength: the same LoRA twice adds up; a total of 0 drops out."""
    total: dict[str, float] = {}
    for patch in patches:
        key = key_of(patch.name)
        total[key] = total.get(key, 0.0) + patch.strength
    return {k: s for k, s in total.items() if s != 0.0}


def folded_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with its active LoRAs added in, under the plain (non-peft) names."""
    state = {name.replace(".base_layer", ""): tensor for name, tensor in module.state_dict().items()
             if ".lora_" not in name}
    for name, layer in module.named_modules():
        if not isinstance(layer, BaseTunerLayer) or layer.disable_adapters:
            continue
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}):
                key = f"{name}.weight"
                state[key] = state[key] + layer.get_delta_weight(adapter).to(state[key].dtype)
    return state
