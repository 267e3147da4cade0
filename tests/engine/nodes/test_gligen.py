"""GLIGENLoader and GLIGENTextBoxApply against ComfyUI 0.3.64 (nodes.py; comfy/gligen.py's PositionNet, Fourier
embedder, GatedSelfAttentionDense and set_position; comfy/samplers.py apply_empty_x_to_equal_area) written out
compactly here, on a tiny GLIGEN file in ComfyUI's layout for the tiny SD1.5's widths, and in graphs."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from engine.errors import UnsupportedModel, WorkflowInvalid
from engine.executor import Executor
from engine.models.convert import convert_file
from engine.models.gligen import build_gligen, gligen_fused, grounding, read_gligen, unet_transformers
from engine.nodes import catalog
from engine.nodes.base import RunMeta
from engine.nodes.gligen import spread_to_negative
from engine.nodes.guidance import guided_eps
from engine.values import CondItem, Conditioning, GligenRef
from tests.conftest import tiny_executor
from tests.engine.conftest import txt2img

# the tiny SD1.5 UNet's transformers in ComfyUI's order: input_blocks 1, 2 (32 wide), middle_block 1 (64),
# output_blocks 3, 4, 5 (32); its CLIP (and so the boxes' pooled text) is 32 wide
TINY_LAYERS = (("input_blocks.1.1", 32), ("input_blocks.2.1", 32), ("middle_block.1", 64),
               ("output_blocks.3.1", 32), ("output_blocks.4.1", 32), ("output_blocks.5.1", 32))
TINY_KEY_DIM = 32


def fuser_weights(query: int, key: int, generator: torch.Generator, alpha: float = 0.8) -> dict[str, torch.Tensor]:
    """A GatedSelfAttentionDense's weights under ComfyUI's names, random, its gates open (tanh(alpha) != 0)."""
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.2

    inner = query * 4  # FeedForward(mult=4) with a GEGLU: the projection gives twice that
    return {"linear.weight": r(query, key), "linear.bias": r(query), "attn.to_q.weight": r(query, query),
            "attn.to_k.weight": r(query, query), "attn.to_v.weight": r(query, query),
            "attn.to_out.0.weight": r(query, query), "attn.to_out.0.bias": r(query),
            "ff.net.0.proj.weight": r(inner * 2, query), "ff.net.0.proj.bias": r(inner * 2),
            "ff.net.2.weight": r(query, inner), "ff.net.2.bias": r(query),
            "norm1.weight": 1 + r(query), "norm1.bias": r(query), "norm2.weight": 1 + r(query),
            "norm2.bias": r(query), "alpha_attn": torch.tensor(alpha), "alpha_dense": torch.tensor(-alpha / 2)}


def gligen_state(layers: tuple[tuple[str, int], ...], key_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A GLIGEN file's tensors in ComfyUI's layout: "<block>.transformer_blocks.0.fuser.*" and "position_net.*"."""
    generator = torch.Generator().manual_seed(seed)
    state = {f"{block}.transformer_blocks.0.fuser.{name}": value for block, query in layers
             for name, value in fuser_weights(query, key_dim, generator).items()}
    sizes = {"linears.0.weight": (512, key_dim + 64), "linears.0.bias": (512,), "linears.2.weight": (512, 512),
             "linears.2.bias": (512,), "linears.4.weight": (key_dim, 512), "linears.4.bias": (key_dim,),
             "null_positive_feature": (key_dim,), "null_position_feature": (64,)}
    state |= {f"position_net.{name}": torch.randn(shape, generator=generator) * 0.1 for name, shape in sizes.items()}
    return state


# -- ComfyUI's modules, compactly ---------------------------------------------------------------------------------


def comfy_fourier(x: torch.Tensor, num_freqs: int = 8, temperature: float = 100) -> torch.Tensor:
    """comfy/gligen.py FourierEmbedder: sin, cos of each frequency times the xyxy, concatenated."""
    out = []
    for freq in temperature ** (torch.arange(num_freqs) / num_freqs):
        out += [torch.sin(freq * x), torch.cos(freq * x)]
    return torch.cat(out, -1)


def comfy_position_net(sd: dict[str, torch.Tensor], boxes: torch.Tensor, masks: torch.Tensor,
                       positive: torch.Tensor) -> torch.Tensor:
    """comfy/gligen.py PositionNet.forward with the file's position_net.* weights."""
    masks = masks.unsqueeze(-1)
    xyxy = comfy_fourier(boxes)
    positive = positive * masks + (1 - masks) * sd["position_net.null_positive_feature"].view(1, 1, -1)
    xyxy = xyxy * masks + (1 - masks) * sd["position_net.null_position_feature"].view(1, 1, -1)
    h = torch.cat([positive, xyxy], dim=-1)
    for i in (0, 2, 4):
        h = F.linear(h, sd[f"position_net.linears.{i}.weight"], sd[f"position_net.linears.{i}.bias"])
        h = F.silu(h) if i < 4 else h
    return h


def comfy_set_position(params: list[tuple[Any, ...]], shape: tuple[int, ...],
                       key_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """comfy/gligen.py Gligen.set_position's boxes, masks and conds (before the position net)."""
    batch, _, h, w = shape
    masks = torch.zeros([30])
    boxes, positive = [], []
    for p in params:
        masks[len(boxes)] = 1.0
        boxes += [torch.tensor((p[4] / w, p[3] / h, (p[4] + p[2]) / w, (p[3] + p[1]) / h)).unsqueeze(0)]
        positive += [p[0]]
    boxes += [torch.zeros([30 - len(params), 4])]
    positive += [torch.zeros([30 - len(params), key_dim])]
    return (torch.cat(boxes).unsqueeze(0).repeat(batch, 1, 1), masks.unsqueeze(0).repeat(batch, 1),
            torch.cat(positive).unsqueeze(0).repeat(batch, 1, 1))


def comfy_gated(sd: dict[str, torch.Tensor], x: torch.Tensor, objs: torch.Tensor, heads: int) -> torch.Tensor:
    """comfy/gligen.py GatedSelfAttentionDense.forward (CrossAttention over [x, linear(objs)], GEGLU FeedForward)."""
    def layer_norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    def attention(t: torch.Tensor) -> torch.Tensor:
        q, k, v = (t @ sd[f"attn.to_{n}.weight"].T for n in "qkv")
        b, n, inner = q.shape
        split = lambda z: z.view(b, n, heads, inner // heads).transpose(1, 2)  # noqa: E731
        weights = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(inner // heads)).softmax(-1)
        out = (weights @ split(v)).transpose(1, 2).reshape(b, n, inner)
        return F.linear(out, sd["attn.to_out.0.weight"], sd["attn.to_out.0.bias"])

    def feed_forward(t: torch.Tensor) -> torch.Tensor:
        h, gate = F.linear(t, sd["ff.net.0.proj.weight"], sd["ff.net.0.proj.bias"]).chunk(2, dim=-1)
        return F.linear(h * F.gelu(gate), sd["ff.net.2.weight"], sd["ff.net.2.bias"])

    n_visual = x.shape[1]
    objs = F.linear(objs, sd["linear.weight"], sd["linear.bias"])
    x = x + torch.tanh(sd["alpha_attn"]) * attention(layer_norm(torch.cat([x, objs], dim=1), "norm1"))[:, :n_visual]
    return x + torch.tanh(sd["alpha_dense"]) * feed_forward(layer_norm(x, "norm2"))


def comfy_spread(conds: list[dict[str, Any]], uncond: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """comfy/samplers.py apply_empty_x_to_equal_area(positive, negative, 'gligen', lambda c, x: c[x])."""
    uncond = list(uncond)
    cond_cnets = [x["gligen"] for x in conds if "area" not in x and x.get("gligen") is not None]
    uncond_cnets = [x for x in uncond if "area" not in x and x.get("gligen") is not None]
    uncond_other = [(x, t) for t, x in enumerate(uncond) if "area" not in x and x.get("gligen") is None]
    if uncond_cnets:
        return uncond
    for x in range(len(cond_cnets)):
        o, t = uncond_other[x % len(uncond_other)]
        n = o.copy()
        n["gligen"] = cond_cnets[x]
        uncond[t] = n
    return uncond


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal up to float32 rounding: 1e-5 of the values' scale (at least 1)."""
    return float((ours - theirs).abs().max()) <= 1e-5 * max(1.0, float(theirs.abs().max()))


def fused_output(sd: dict[str, torch.Tensor], block: str, query: int, x: torch.Tensor,
                 objs: torch.Tensor, heads: int) -> torch.Tensor:
    prefix = f"{block}.transformer_blocks.0.fuser."
    return comfy_gated({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, x, objs, heads)


# -- the math -----------------------------------------------------------------------------------------------------


def test_boxes_and_the_position_net_are_comfys() -> None:
    sd = gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=1)
    model = build_gligen("tiny", sd)
    gen = torch.Generator().manual_seed(2)
    params = [(torch.randn(1, 32, generator=gen), 38, 24, 34, 22), (torch.randn(1, 32, generator=gen), 18, 18, 2, 52)]
    ours = grounding(params, 2, 96, 96, TINY_KEY_DIM)
    theirs = comfy_set_position(params, (2, 4, 96, 96), TINY_KEY_DIM)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert ours[1][0].tolist() == [1.0, 1.0] + [0.0] * 28  # 30 slots, two used
    objs = model.objs(params, 2, 96, 96, torch.device("cpu"))
    expected = comfy_position_net(sd, *theirs)
    assert objs.shape == (2, 30, TINY_KEY_DIM)
    assert close(objs, expected)


@pytest.mark.parametrize(("query", "key", "heads"), [(128, 768, 8), (128, 32, 2), (32, 32, 1)])
def test_a_gated_layer_is_comfys_with_its_head_count(query: int, key: int, heads: int) -> None:
    # load_gligen: 8 heads for SD1.x's 768-wide context, else 64-wide heads; one head under 64 (ComfyUI has none)
    layers = (("input_blocks.1.1", query),)
    sd = gligen_state(layers, key, seed=3)
    fuser = build_gligen("g", sd).fusers[0]
    assert fuser.attn.heads == heads
    gen = torch.Generator().manual_seed(4)
    x, objs = torch.randn(2, 16, query, generator=gen), torch.randn(2, 30, key, generator=gen)
    with torch.no_grad():
        assert close(fuser(x, objs), fused_output(sd, "input_blocks.1.1", query, x, objs, heads))


def test_a_file_missing_a_key_or_the_position_net_is_refused() -> None:
    sd = gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=1)
    with pytest.raises(UnsupportedModel, match="input_blocks.1 lacks norm2.weight"):
        dropped = "input_blocks.1.1.transformer_blocks.0.fuser.norm2.weight"
        build_gligen("g", {k: v for k, v in sd.items() if k != dropped})
    with pytest.raises(UnsupportedModel, match="position net lacks"):
        build_gligen("g", {k: v for k, v in sd.items() if not k.startswith("position_net.")})
    with pytest.raises(UnsupportedModel, match="no gated layers"):
        build_gligen("g", {"position_net.null_positive_feature": torch.zeros(4)})


def test_a_pth_converts_and_loads_the_same(tmp_path: Path) -> None:
    sd = gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=1)
    torch.save(sd, tmp_path / "gligen_sd14_textbox_pruned.pth")
    converted = convert_file(tmp_path / "gligen_sd14_textbox_pruned.pth")
    ours, direct = read_gligen(converted.target, "g").state_dict(), build_gligen("g", sd).state_dict()
    assert ours.keys() == direct.keys() and all(torch.equal(ours[k], direct[k]) for k in ours)


def test_the_positive_boxes_reach_the_negative_as_comfy_hands_them() -> None:
    e = torch.zeros(1, 77, 4)
    a, b = ("position", "A", [1]), ("position", "B", [2])
    cases = [([{"gligen": a}], [{}]), ([{"gligen": a}, {"gligen": b}], [{}]),
             ([{"gligen": a}, {"gligen": b}, {}], [{}, {"area": (8, 8, 0, 0)}, {}]),
             ([{"gligen": a}], [{"gligen": b}]), ([{"gligen": a, "area": (8, 8, 0, 0)}], [{}])]
    for pos, neg in cases:
        ours = spread_to_negative(Conditioning(tuple(CondItem(e, None, dict(d)) for d in pos)),
                                  Conditioning(tuple(CondItem(e, None, dict(d)) for d in neg)))
        assert [item.extras for item in ours.items] == comfy_spread(pos, neg)


# -- on the tiny SD1.5 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gligen_executor(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Executor:
    """An executor over the tiny checkpoints and a gligen folder with a tiny GLIGEN file of this module's own."""
    root = tmp_path_factory.mktemp("gligen")
    models = root / "models"
    (models / "gligen").mkdir(parents=True)
    (models / "checkpoints").symlink_to(tiny_models / "checkpoints", target_is_directory=True)
    save_file(gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=7), str(models / "gligen" / "tiny-gligen.safetensors"))
    (models / "gligen" / "old.pth").write_bytes(b"not loaded")
    return tiny_executor(models, root / "run")


def with_boxes(workflow: dict[str, Any], name: str = "tiny-gligen.safetensors") -> dict[str, Any]:
    """The ComfyUI example's shape: two text boxes on the positive prompt."""
    changed = copy.deepcopy(workflow)
    changed["10"] = {"class_type": "GLIGENLoader", "inputs": {"gligen_name": name}}
    changed["21"] = {"class_type": "GLIGENTextBoxApply", "inputs": {
        "text": "purple galaxy bottle", "width": 24, "height": 40, "x": 16, "y": 16,
        "conditioning_to": ["6", 0], "clip": ["4", 1], "gligen_textbox_model": ["10", 0]}}
    changed["27"] = {"class_type": "GLIGENTextBoxApply", "inputs": {
        "text": "sun", "width": 16, "height": 16, "x": 40, "y": 0,
        "conditioning_to": ["21", 0], "clip": ["4", 1], "gligen_textbox_model": ["10", 0]}}
    changed["3"]["inputs"]["positive"] = ["27", 0]
    return changed


def pixels(executor: Executor, workflow: dict[str, Any]) -> np.ndarray:
    [image] = executor.run(workflow).outputs["9"]["images"]
    return np.asarray(Image.open(executor.settings.output_dir / image["subfolder"] / image["filename"])).astype(int)


def context(executor: Executor) -> Any:
    return SimpleNamespace(node_id="21", models=executor.models, limits=executor.limits, meta=RunMeta(),
                           prompt_weighting="comfy", prompt_syntax="noodle")


def test_the_folder_is_listed_and_a_pickle_is_refused_with_the_convert_command(gligen_executor: Executor) -> None:
    assert gligen_executor.models.choices("gligen") == ["tiny-gligen.safetensors"]
    with pytest.raises(WorkflowInvalid) as err:
        gligen_executor.validate(with_boxes(txt2img(), name="old.pth"))
    message = str(err.value.body)
    assert "pickle file" in message and "noodle convert" in message


def test_the_text_box_node_appends_comfys_entry_to_each_cond(gligen_executor: Executor) -> None:
    ctx = context(gligen_executor)
    nodes = catalog()
    _, clip, _ = nodes["CheckpointLoaderSimple"].model_construct(ckpt_name="tiny-sd15.safetensors").run(ctx)
    (gligen,) = nodes["GLIGENLoader"].model_construct(gligen_name="tiny-gligen.safetensors").run(ctx)
    e = torch.zeros(1, 77, 32)
    conds = Conditioning((CondItem(e, None, {"strength": 0.5}), CondItem(e, None, {})))
    apply = nodes["GLIGENTextBoxApply"]
    (once,) = apply.model_construct(conditioning_to=conds, clip=clip, gligen_textbox_model=gligen,
                                    text="a red fox", width=100, height=60, x=13, y=30).run(ctx)
    # a later node's boxes join the earlier ones; CLIPSetLastLayer does not change the pooled text
    (twice,) = apply.model_construct(conditioning_to=once, clip=replace(clip, stop_at_layer=-2),
                                     gligen_textbox_model=gligen, text="a red fox", width=64, height=64, x=0,
                                     y=8).run(ctx)
    model = ctx.models.use_text_encoders(clip)[0]
    ids = clip.pipe.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = model(input_ids=ids).pooler_output.float()  # the unprojected pooled output, ComfyUI's
    for item in twice.items:
        kind, ref, params = item.extras["gligen"]
        assert kind == "position" and ref is gligen and isinstance(ref, GligenRef)
        assert [p[1:] for p in params] == [(7, 12, 3, 1), (8, 8, 1, 0)]  # (height, width, y, x) // 8
        for p in params:
            assert (p[0] - pooled).abs().max() < 1e-5
    assert twice.items[0].extras["strength"] == 0.5 and "gligen" not in conds.items[0].extras
    full = Conditioning((CondItem(e, None, {"gligen": ("position", gligen, [params[0]] * 30)}),))
    with pytest.raises(ValueError, match="already has 30 GLIGEN text boxes; GLIGEN takes at most 30"):
        apply.model_construct(conditioning_to=full, clip=clip, gligen_textbox_model=gligen, text="sun", width=8,
                              height=8, x=0, y=0).run(ctx)


def test_one_gated_transformer_block_is_comfys_and_its_hooks_go_away_even_on_errors(
        gligen_executor: Executor) -> None:
    ctx = context(gligen_executor)
    unet = gligen_executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet
    (gligen,) = catalog()["GLIGENLoader"].model_construct(gligen_name="tiny-gligen.safetensors").run(ctx)
    sd = gligen_state(TINY_LAYERS, TINY_KEY_DIM, seed=7)
    gen = torch.Generator().manual_seed(5)
    entry = ("position", gligen, [(torch.randn(1, 32, generator=gen), 3, 4, 1, 2)])
    transformer = unet_transformers(unet)[2]  # the middle block's, 64 wide
    block = transformer.transformer_blocks[0]
    x, text = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 77, 32, generator=gen)
    objs = comfy_position_net(sd, *comfy_set_position(entry[2], (1, 4, 4, 4), TINY_KEY_DIM))
    with torch.no_grad():
        plain = block(x, encoder_hidden_states=text)
        # the second row has no boxes: ComfyUI gives that cond no gated layer
        with gligen_fused(unet, [(entry, 1), (None, 1)], (2, 4, 4, 4)):
            hooked = block(x, encoder_hidden_states=text)
        h = block.attn1(block.norm1(x)) + x  # BasicTransformerBlock: the self-attention's residual
        h = torch.cat([fused_output(sd, "middle_block.1", 64, h[:1], objs, 1), h[1:]])  # ComfyUI's middle_patch
        h = block.attn2(block.norm2(h), encoder_hidden_states=text) + h
        expected = block.ff(block.norm3(h)) + h
        assert close(hooked, expected)
        assert torch.equal(hooked[1], plain[1]) and not torch.allclose(hooked[0], plain[0], atol=1e-3)
        with pytest.raises(RuntimeError, match="boom"):
            with gligen_fused(unet, [(entry, 2)], (2, 4, 4, 4)):
                raise RuntimeError("boom")
        assert torch.equal(block(x, encoder_hidden_states=text), plain)
    for t in unet_transformers(unet):
        for b in t.transformer_blocks:
            assert "fuser" not in b.__dict__ and not b._forward_pre_hooks


def test_the_sampler_hands_the_positive_boxes_to_the_negative(gligen_executor: Executor) -> None:
    ctx = context(gligen_executor)
    unet = gligen_executor.models.checkpoint("tiny-sd15.safetensors").pipe.unet
    (gligen,) = catalog()["GLIGENLoader"].model_construct(gligen_name="tiny-gligen.safetensors").run(ctx)
    gen = torch.Generator().manual_seed(6)
    entry = ("position", gligen, [(torch.randn(1, 32, generator=gen), 4, 3, 2, 1)])
    text, negative_text = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    boxed = Conditioning((CondItem(text, None, {"gligen": entry}),))
    plain_negative = Conditioning((CondItem(negative_text, None, {}),))
    boxed_negative = Conditioning((CondItem(negative_text, None, {"gligen": entry}),))
    x, t, sigma = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500.0]), torch.tensor(3.0)
    with torch.no_grad():
        spread = guided_eps(unet, boxed, plain_negative, 5.0, False, (64, 64)).with_uncond(x, t, sigma)
        given = guided_eps(unet, boxed, boxed_negative, 5.0, False, (64, 64)).with_uncond(x, t, sigma)
        plain = guided_eps(unet, Conditioning((CondItem(text, None, {}),)), plain_negative, 5.0, False,
                           (64, 64)).with_uncond(x, t, sigma)
    assert torch.equal(spread[1], given[1]) and torch.equal(spread[0], given[0])
    assert not torch.allclose(spread[1], plain[1], atol=1e-4)


def test_a_gligen_workflow_changes_the_picture_and_a_plain_one_after_it_does_not(
        gligen_executor: Executor) -> None:
    plain = txt2img(seed=1504)
    before = pixels(gligen_executor, plain)
    boxed = pixels(gligen_executor, with_boxes(plain))
    gligen_executor.cache.clear()
    assert np.array_equal(pixels(gligen_executor, plain), before)
    assert np.abs(boxed - before).max() > 0
    assert "tiny-gligen.safetensors" in str(gligen_executor.run(with_boxes(plain)).meta)
