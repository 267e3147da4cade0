"""GLIGEN text-box grounding: ComfyUI 0.3.64's gligen file read into diffusers' own GLIGEN modules, its text boxes
turned into grounding tokens, and its gated self-attention hooked into the shared UNet for one UNet call.

The file (comfy/gligen.py load_gligen's layout): per transformer of the UNet, keys "...<blocks>.<n>....fuser.<name>"
(found anywhere in the key, as ComfyUI's substring match), <blocks> input_blocks, middle_block, output_blocks, read
in that order and by n: a GatedSelfAttentionDense's linear, attn.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2,
norm1, norm2, alpha_attn, alpha_dense. Then "position_net.*": the PositionNet's linears.0/2/4,
null_positive_feature and null_position_feature. Diffusers' GatedSelfAttentionDense and
GLIGENTextBoundingboxProjection ("text-only") have those very names and compute the same thing as ComfyUI's
(x + tanh(alpha_attn) * attn(norm1([x, linear(objs)]))[:, :n_visual], then + tanh(alpha_dense) * ff(norm2(x)) with a
GEGLU feed-forward; sin/cos Fourier features of xyxy at 100 ** (k / 8), laid out frequency-major, sin then cos, the
four coordinates inside; padding rows replaced by the null features): so the file loads into them unchanged.

ComfyUI's head count is kept: 8 heads for a 768-wide context (SD1.x), else 64-wide heads. Under 64 channels (tiny
test models only) that is 0 heads, which ComfyUI cannot build; Noodle uses one head there. A file missing a
module's key is refused (ComfyUI's strict=False would leave it at random initial values).

At sampling time (comfy/samplers.py get_area_and_mult + Gligen.set_position) each cond's boxes become, for the
latent [b, c, h, w] the cond sees, xyxy in 0..1 over 30 slots (ComfyUI's max_objs; unused slots masked out, their
text zeros), the box text's pooled CLIP output next to them; the position net turns them into the grounding tokens
in float32. `gligen_fused` then hooks every transformer block of the UNet for one call: diffusers' own
BasicTransformerBlock applies `self.fuser` right after the self-attention's residual, where ComfyUI's middle_patch
runs, when its cross_attention_kwargs carry "gligen"; a forward pre-hook adds that key and the block gets a fuser
that runs the i-th gated layer on the rows of the conds that have boxes (the i-th SpatialTransformer, ComfyUI's
transformer_index). The hooks and fusers are removed on the way out, on errors too. The tokens and row indices are
put on the device once per sampling run (GligenInputs), not at each call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, GatedSelfAttentionDense
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from torch import nn
from torch.utils.hooks import RemovableHandle

from engine.errors import UnsupportedModel
from engine.models.detect import read_safetensors

__all__ = ["MAX_OBJS", "Gligen", "GligenInputs", "build_gligen", "gligen_fused", "grounding", "read_gligen", "unet_transformers"]

MAX_OBJS = 30  # comfy/gligen.py Gligen.max_objs
_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_FUSER_KEYS = ("linear.weight", "linear.bias", "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
               "attn.to_out.0.weight", "attn.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
               "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
               "alpha_attn", "alpha_dense")
_POSITION_KEYS = ("linears.0.weight", "linears.0.bias", "linears.2.weight", "linears.2.bias", "linears.4.weight",
                  "linears.4.bias", "null_positive_feature", "null_position_feature")


class Gligen(nn.Module):
    """A loaded GLIGEN: one gated self-attention per UNet transformer (in ComfyUI's order) and the position net;
    `key_dim` is the width of the box texts' pooled vectors (the last gated layer's context width, as ComfyUI)."""

    def __init__(self, fusers: Sequence[GatedSelfAttentionDense], position_net: GLIGENTextBoundingboxProjection,
                 key_dim: int) -> None:
        super().__init__()
        self.fusers = nn.ModuleList(fusers)
        self.position_net = position_net
        self.key_dim = key_dim

    def objs(self, params: Sequence[tuple[Any, ...]], batch: int, height: int, width: int,
             device: torch.device) -> torch.Tensor:
        """The grounding tokens [batch, 30, out] for one cond's boxes on a latent of height x width cells."""
        boxes, masks, texts = grounding(params, batch, height, width, self.key_dim)
        self.position_net.to(device=device, dtype=torch.float32)
        with torch.no_grad():
            return self.position_net(boxes.to(device), masks.to(device), texts.to(device))


def grounding(params: Sequence[tuple[Any, ...]], batch: int, height: int, width: int,
              key_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gligen.set_position's boxes [batch, 30, 4], masks [batch, 30] and texts [batch, 30, key_dim], float32.

    Each param is GLIGENTextBoxApply's (pooled [1, key_dim], height, width, y, x) in latent cells; a box is
    (x / w, y / h, (x + width) / w, (y + height) / h) of the latent the cond sees."""
    if len(params) > MAX_OBJS:
        raise ValueError(f"a cond has {len(params)} GLIGEN text boxes; GLIGEN takes at most {MAX_OBJS} "
                         "(one GLIGENTextBoxApply adds one)")
    boxes = torch.zeros(MAX_OBJS, 4)
    masks = torch.zeros(MAX_OBJS)
    texts = torch.zeros(MAX_OBJS, key_dim)
    for slot, (pooled, box_h, box_w, y, x) in enumerate(params):
        boxes[slot] = torch.tensor((x / width, y / height, (x + box_w) / width, (y + box_h) / height))
        masks[slot] = 1.0
        vector = pooled.reshape(-1).float()
        if vector.shape[0] != key_dim:
            raise ValueError(f"a GLIGEN text box's text encodes to {vector.shape[0]} features, but this GLIGEN "
                             f"model takes {key_dim}: use the CLIP of the checkpoint the GLIGEN model was made for")
        texts[slot] = vector.cpu()
    return (boxes.unsqueeze(0).repeat(batch, 1, 1), masks.unsqueeze(0).repeat(batch, 1),
            texts.unsqueeze(0).repeat(batch, 1, 1))


def _heads(query_dim: int, key_dim: int) -> tuple[int, int]:
    # load_gligen: SD1.x's 768-wide context gets 8 heads, anything else 64-wide heads; a width under 64 (tiny test
    # models) would get none, which ComfyUI cannot build: one head there
    if key_dim == 768:
        return 8, query_dim // 8
    heads = query_dim // 64
    return (heads, 64) if heads > 0 else (1, query_dim)


def _fuser(name: str, where: str, weights: Mapping[str, torch.Tensor]) -> GatedSelfAttentionDense:
    missing = [key for key in _FUSER_KEYS if key not in weights]
    if missing:
        raise UnsupportedModel(f"GLIGEN file {name!r}: the gated layer at {where} lacks {', '.join(missing)}")
    query_dim, key_dim = weights["linear.weight"].shape
    heads, d_head = _heads(int(query_dim), int(key_dim))
    if heads * d_head != weights["attn.to_q.weight"].shape[0]:
        raise UnsupportedModel(f"GLIGEN file {name!r}: the gated layer at {where} is {query_dim} wide, which "
                               f"ComfyUI's {heads} heads of {d_head} do not divide")
    fuser = GatedSelfAttentionDense(int(query_dim), int(key_dim), heads, d_head)
    fuser.load_state_dict({key: weights[key].float() for key in _FUSER_KEYS})
    return fuser.eval()


def build_gligen(name: str, state: Mapping[str, torch.Tensor]) -> Gligen:
    """A Gligen from a file's tensors in ComfyUI's layout (module docstring); errors name what is missing."""
    fusers: list[GatedSelfAttentionDense] = []
    key_dim = 768
    for blocks in _BLOCKS:
        for number in range(20):  # load_gligen's range
            prefix = f"{blocks}.{number}."
            found = {key.split(".fuser.")[-1]: value for key, value in state.items()
                     if prefix in key and ".fuser." in key}
            if found:
                fusers.append(_fuser(name, f"{blocks}.{number}", found))
                key_dim = int(found["linear.weight"].shape[1])
    if not fusers:
        raise UnsupportedModel(f"GLIGEN file {name!r} has no gated layers ('...fuser.*' keys): not a GLIGEN model")
    position = {key[len("position_net."):]: value for key, value in state.items() if key.startswith("position_net.")}
    missing = [key for key in _POSITION_KEYS if key not in position]
    if missing:
        raise UnsupportedModel(f"GLIGEN file {name!r}: the position net lacks {', '.join(missing)}; only "
                               "text-box GLIGEN models (ComfyUI's PositionNet) load")
    in_dim = int(position["null_positive_feature"].shape[0])
    out_dim = int(position["linears.4.weight"].shape[0])
    fourier = int(position["null_position_feature"].shape[0]) // 8  # 2 (sin, cos) x 4 (xyxy) per frequency
    if fourier != 8:
        raise UnsupportedModel(f"GLIGEN file {name!r}: its position net takes {fourier * 8} position features; "
                               "ComfyUI's PositionNet takes 64 (8 frequencies)")
    net = GLIGENTextBoundingboxProjection(positive_len=in_dim, out_dim=out_dim, feature_type="text-only",
                                          fourier_freqs=8)
    net.load_state_dict({key: position[key].float() for key in _POSITION_KEYS})
    return Gligen(fusers, net.eval(), key_dim)


def read_gligen(path: Path, name: str) -> Gligen:
    """Load a .safetensors GLIGEN file (a pickle is refused even where the owner allows weights-only pickles)."""
    return build_gligen(name, read_safetensors(path, f"GLIGEN file {name!r}"))


def unet_transformers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's transformers in ComfyUI's transformer_index order: down blocks, the middle block, up blocks."""
    found: list[nn.Module] = []
    for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        found += list(getattr(block, "attentions", None) or [])
    return found


class _RowFuser:
    """A block's fuser for one UNet call: each GLIGEN's i-th gated layer on the rows of the conds it grounds; the
    other rows pass unchanged (a cond without boxes has no gated layer in ComfyUI)."""

    def __init__(self, parts: Sequence[tuple[GatedSelfAttentionDense, torch.Tensor, torch.Tensor]],
                 rows: int) -> None:
        self.parts = parts
        self.whole = len(parts) == 1 and parts[0][1].numel() == rows

    def __call__(self, hidden: torch.Tensor, _objs: Any) -> torch.Tensor:
        if self.whole:
            fuser, _, objs = self.parts[0]
            return fuser(hidden, objs.to(hidden.dtype))
        out = hidden.clone()
        for fuser, rows, objs in self.parts:
            out[rows] = fuser(hidden[rows], objs.to(hidden.dtype))
        return out


def _add_gligen_kwarg(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    # BasicTransformerBlock pops "gligen" from a copy of its cross_attention_kwargs and runs self.fuser after the
    # self-attention's residual; the attention processors never see the key
    extra = dict(kwargs.get("cross_attention_kwargs") or {})
    extra["gligen"] = {"objs": None}  # the rows' own tokens are in the _RowFuser
    return args, {**kwargs, "cross_attention_kwargs": extra}


class GligenInputs:
    """One sampling run's grounding tokens and row indices, put on the device at the first UNet call and reused
    at every later one: a cond's boxes, its row count and the latent size are the same at each step, and building
    them again would copy them from the host (a wait for the device, engine/samplers/loop.py) at every call."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[int, int, int, int], tuple[Any, torch.Tensor]] = {}
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def tokens(self, model: Gligen, entry: tuple[Any, ...], rows: int, height: int, width: int,
               device: torch.device) -> torch.Tensor:
        key = (id(entry), rows, height, width)
        if key not in self._tokens:  # the entry is held beside its tokens, so its id names it for the run
            self._tokens[key] = (entry, model.objs(entry[2], rows, height, width, device))
        return self._tokens[key][1]

    def rows(self, indices: Sequence[int], device: torch.device) -> torch.Tensor:
        key = tuple(indices)
        if key not in self._rows:
            self._rows[key] = torch.tensor(key, device=device)
        return self._rows[key]


@contextmanager
def gligen_fused(unet: nn.Module, conds: Sequence[tuple[Any, int]], shape: Sequence[int],
                 inputs: GligenInputs | None = None) -> Iterator[None]:
    """The UNet with the conds' GLIGEN gated layers for one call over latents of `shape` [B, C, h, w].

    `conds`: per cond in the batch's order, its "gligen" extra (ComfyUI's ("position", GligenRef, params)) or None,
    and how many rows it has. Without any GLIGEN the UNet is left alone. `inputs`: the run's tokens and row
    indices from earlier calls (a fresh set when None)."""
    if all(entry is None for entry, _ in conds):
        yield
        return
    inputs = inputs or GligenInputs()
    device, dtype = unet.device, unet.dtype
    height, width = int(shape[-2]), int(shape[-1])
    # per loaded GLIGEN: the row indices and grounding tokens of the conds it grounds
    grouped: dict[int, tuple[Gligen, list[int], list[torch.Tensor]]] = {}
    offset = 0
    for entry, rows in conds:
        if entry is not None:
            kind, ref, _ = entry
            if kind != "position":
                raise ValueError(f"GLIGEN conditioning of kind {kind!r}: only 'position' (GLIGENTextBoxApply) is known")
            model = ref.module
            _, indices, tokens = grouped.setdefault(id(model), (model, [], []))
            indices.extend(range(offset, offset + rows))
            tokens.append(inputs.tokens(model, entry, rows, height, width, device))
        offset += rows
    transformers = unet_transformers(unet)
    for model, _, _ in grouped.values():
        if len(model.fusers) != len(transformers):
            raise ValueError(f"this GLIGEN model has {len(model.fusers)} gated layers, but the UNet has "
                             f"{len(transformers)} transformers: use it with the checkpoint family it was made for")
        model.fusers.to(device=device, dtype=dtype)
    handles: list[RemovableHandle] = []
    fused: list[BasicTransformerBlock] = []
    try:
        row_indices = {key: inputs.rows(indices, device) for key, (_, indices, _) in grouped.items()}
        objs = {key: torch.cat(tokens) for key, (_, _, tokens) in grouped.items()}
        for index, transformer in enumerate(transformers):
            parts = [(model.fusers[index], row_indices[key], objs[key]) for key, (model, _, _) in grouped.items()]
            for block in transformer.transformer_blocks:
                if "fuser" in block.__dict__ or "fuser" in getattr(block, "_modules", {}):
                    raise ValueError("this UNet already has GLIGEN layers of its own; Noodle's shared UNets have none")
                block.__dict__["fuser"] = _RowFuser(parts, offset)  # a plain attribute: not one of the UNet's modules
                fused.append(block)
                handles.append(block.register_forward_pre_hook(_add_gligen_kwarg, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in fused:
            block.__dict__.pop("fuser", None)
