"""ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength and ConditioningSetMask against
ComfyUI 0.3.64, whose area math is written out compactly here (nodes.py for the extras; comfy/samplers.py
resolve_areas_and_cond_masks_multidim, create_cond_with_same_area_if_none, get_area_and_mult, calc_cond_batch and
cfg_function for sampling): guided_eps on a recording fake UNet whose output depends on where it looks, so a
wrong crop, weight, feathering or twin shows. With inpainting, SDXL, ControlNet and whole graphs:
test_area_conditioning_models.py."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from engine.nodes import catalog
from engine.nodes.area_conditioning import region, resolved_area
from engine.nodes.guidance import guided_eps
from engine.values import CondItem, Conditioning, Mask
from tests.engine.nodes.test_controlnet import comfy_percent_to_sigma

H, W = 16, 24  # latent cells of the 192x128 picture most tests sample
PIXELS = (H * 8, W * 8)


def run(class_type: str, **inputs: Any) -> Conditioning:
    ctx: Any = SimpleNamespace(node_id="12")  # what these nodes read of a RunContext
    (out,) = catalog()[class_type].model_construct(**inputs).run(ctx)
    return out


def flat(value: float, **extras: Any) -> CondItem:
    return CondItem(torch.full((1, 77, 8), value), None, extras)


def conds(*items: CondItem) -> Conditioning:
    return Conditioning(items)


def area(item: CondItem, width: int, height: int, x: int, y: int, strength: float = 1.0) -> CondItem:
    (out,) = run("ConditioningSetArea", conditioning=conds(item), width=width, height=height, x=x, y=y,
                 strength=strength).items
    return out


class SpatialUNet(torch.nn.Module):
    """eps = 0.2 * v * x + 0.02 * cumsum of x along the width + 0.05 * v, v the mean of a row's context (each test
    cond is a constant): what it predicts at a cell depends on the crop it sees. Records each call's input shape
    and v's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.calls: list[tuple[tuple[int, ...], list[float]]] = []

    @staticmethod
    def predict(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v = v.view(-1, 1, 1, 1)
        return 0.2 * v * x + 0.02 * x.cumsum(-1) + 0.05 * v

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> Any:
        values = encoder_hidden_states.mean(dim=(1, 2))
        self.calls.append((tuple(x.shape), sorted(round(float(v), 4) for v in values)))
        return SimpleNamespace(sample=self.predict(x, values))


# -- ComfyUI's area math, compactly (2-D latents; one batch per cond, as the model is row-independent) -------------


def comfy_cond(item: CondItem) -> dict[str, Any]:
    """A cond dict as process_conds sees it: the text as "model_conds", the extras as they are, the timestep range
    as calculate_start_end_timesteps makes it."""
    c = {**item.extras, "model_conds": item.embeds}
    if "start_percent" in c:
        c["timestep_start"] = comfy_percent_to_sigma(c["start_percent"])
    if "end_percent" in c:
        c["timestep_end"] = comfy_percent_to_sigma(c["end_percent"])
    return c


def comfy_mask_aabb(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if torch.max(mask != 0) == False:  # noqa: E712 (as ComfyUI writes it)
        return torch.zeros(4, dtype=torch.int), True
    y, x = torch.where(mask)
    return torch.stack([torch.min(x), torch.min(y), torch.max(x), torch.max(y)]), False


def comfy_resolve(conditions: list[dict[str, Any]], dims: tuple[int, int]) -> None:
    """resolve_areas_and_cond_masks_multidim."""
    for i, c in enumerate(conditions):
        if "area" in c and c["area"][0] == "percentage":
            a = c["area"][1:]
            c = {**c, "area": (max(1, round(a[0] * dims[0])), max(1, round(a[1] * dims[1])), round(a[2] * dims[0]),
                               round(a[3] * dims[1]))}
        if "mask" in c:
            mask = c["mask"]
            if len(mask.shape) == len(dims):
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != dims:
                mask = F.interpolate(mask.unsqueeze(1), size=dims, mode="bilinear").squeeze(1)
            c = {**c, "mask": mask}
            if c.get("set_area_to_bounds", False):
                box, empty = comfy_mask_aabb(torch.max(torch.abs(mask), dim=0).values)
                if empty:
                    c["area"] = (8, 8, 0, 0)
                else:
                    c["area"] = (int(max(8, box[3] - box[1] + 1)), int(max(8, box[2] - box[0] + 1)), int(box[1]),
                                 int(box[0]))
        conditions[i] = c


def comfy_same_area(conds_: list[dict[str, Any]], c: dict[str, Any]) -> None:
    """create_cond_with_same_area_if_none."""
    if "area" not in c:
        return

    def inside(a: tuple[int, ...], cmp: tuple[int, ...]) -> bool:
        return all(a[2 + i] >= cmp[2 + i] and a[i] + a[2 + i] <= cmp[i] + cmp[2 + i] for i in range(2))

    smallest = None
    for x in conds_:
        if "area" in x:
            if inside(c["area"], x["area"]):
                if smallest is None or "area" not in smallest:
                    smallest = x
                elif math.prod(smallest["area"][:2]) > math.prod(x["area"][:2]):
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or ("area" in smallest and smallest["area"] == c["area"]):
        return
    conds_ += [{**c, "model_conds": smallest["model_conds"]}]


def comfy_area_and_mult(c: dict[str, Any], x_in: torch.Tensor, sigma: float) -> Any:
    """get_area_and_mult."""
    if sigma > c.get("timestep_start", math.inf) or sigma < c.get("timestep_end", -math.inf):
        return None
    area = list(c["area"]) if "area" in c else None
    input_x = x_in
    if area is not None:
        for i in range(2):
            area[i] = min(input_x.shape[i + 2] - area[2 + i], area[i])
            input_x = input_x.narrow(i + 2, area[2 + i], area[i])
    if "mask" in c:
        mask = c["mask"][:input_x.shape[0]]
        if area is not None:
            for i in range(2):
                mask = mask.narrow(i + 1, area[2 + i], area[i])
        mask = mask * c.get("mask_strength", 1.0)
        mask = mask.unsqueeze(1).repeat((input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1))
    else:
        mask = torch.ones_like(input_x)
    mult = mask * c.get("strength", 1.0)
    if "mask" not in c and area is not None:
        for i in range(2):
            rr = min(8, mult.shape[2 + i] // 4)
            if area[2 + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[2 + i] < x_in.shape[i + 2]:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return input_x, mult, area


def comfy_calc_cond_batch(sides: list[list[dict[str, Any]] | None], x_in: torch.Tensor, sigma: float,
                          shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """calc_cond_batch for an eps model (apply_model: x - sigma * eps(x / sqrt(sigma^2 + 1))); `shapes` gets the
    input shape of each cond that runs (ComfyUI batches those of one shape)."""
    out_conds = [torch.zeros_like(x_in) for _ in sides]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in sides]
    for i, side in enumerate(sides):
        for c in side or ():
            p = comfy_area_and_mult(c, x_in, sigma)
            if p is None:
                continue
            input_x, mult, a = p
            shapes.append(tuple(input_x.shape))
            v = c["model_conds"].mean().reshape(1)
            output = input_x - sigma * SpatialUNet.predict(input_x / math.sqrt(sigma**2 + 1), v)
            out_c, out_cts = out_conds[i], out_counts[i]
            if a is not None:
                for d in range(2):
                    out_c, out_cts = out_c.narrow(d + 2, a[2 + d], a[d]), out_cts.narrow(d + 2, a[2 + d], a[d])
            out_c += output * mult
            out_cts += mult
    return [c / n for c, n in zip(out_conds, out_counts)]


def comfy_guided(positive: Conditioning, negative: Conditioning, scaled: torch.Tensor, sigma: float,
                 cfg: float) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """ComfyUI's denoised estimate (process_conds, then sampling_function) and the cond shapes it ran."""
    x_in = scaled * math.sqrt(sigma**2 + 1)
    dims = (x_in.shape[2], x_in.shape[3])
    sides = {"positive": [comfy_cond(i) for i in positive.items], "negative": [comfy_cond(i) for i in negative.items]}
    for k in sides:
        comfy_resolve(sides[k], dims)
    for k in sides:
        for c in sides[k]:
            for kk in sides:
                if k != kk:
                    comfy_same_area(sides[kk], c)
    shapes: list[tuple[int, ...]] = []
    cond, uncond = comfy_calc_cond_batch([sides["positive"], None if math.isclose(cfg, 1.0) else sides["negative"]],
                                         x_in, sigma, shapes)
    return uncond + (cond - uncond) * cfg, shapes


def ours(positive: Conditioning, negative: Conditioning, scaled: torch.Tensor, sigma: float,
         cfg: float, unet: SpatialUNet | None = None) -> torch.Tensor:
    """guided_eps's denoised estimate, x - sigma * eps."""
    eps = guided_eps(unet or SpatialUNet(), positive, negative, cfg, False, (scaled.shape[2] * 8, scaled.shape[3] * 8))
    return scaled * math.sqrt(sigma**2 + 1) - sigma * eps(scaled, torch.tensor([500.0]), torch.tensor(sigma))


def latents(batch: int = 1, height: int = H, width: int = W, seed: int = 3) -> torch.Tensor:
    return torch.randn((batch, 4, height, width), generator=torch.Generator().manual_seed(seed))


def assert_matches_comfyui(positive: Conditioning, negative: Conditioning, *, sigma: float = 1.5, cfg: float = 6.0,
                           scaled: torch.Tensor | None = None) -> float:
    """Our estimate within 1e-5 of ComfyUI's (relative to the estimate's size where it is over 1: float32's rounding
    at sigma 14.6); our UNet calls are ComfyUI's conds batched by shape. The difference comes back, for the
    record."""
    scaled = latents() if scaled is None else scaled
    unet = SpatialUNet()
    got = ours(positive, negative, scaled, sigma, cfg, unet)
    expected, shapes = comfy_guided(positive, negative, scaled, sigma, cfg)
    difference = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    assert difference < 1e-5, difference
    batch = scaled.shape[0]
    ran = {shape: sum(s == shape for s in shapes) for shape in shapes}
    assert sorted((shape[1:], len(values) // batch) for shape, values in unet.calls) == sorted(
        (shape[1:], n) for shape, n in ran.items())
    return difference


LEFT, RIGHT, FULL, NEG = 1.0, 2.0, 3.0, 0.5


def left_right_full(strength: float = 1.0) -> Conditioning:
    """ComfyUI's area composition: a prompt for each half and one for the whole picture."""
    return conds(area(flat(LEFT), 96, 128, 0, 0, strength), area(flat(RIGHT), 96, 128, 96, 0), flat(FULL))


# -- the nodes ------------------------------------------------------------------------------------------------------


def test_the_nodes_put_comfyuis_keys_on_every_cond() -> None:
    given = conds(flat(1.0, width=1024), flat(2.0))
    placed = run("ConditioningSetArea", conditioning=given, width=200, height=100, x=36, y=8, strength=0.7)
    assert [i.extras for i in placed.items] == [
        {"width": 1024, "area": (12, 25, 1, 4), "strength": 0.7, "set_area_to_bounds": False},
        {"area": (12, 25, 1, 4), "strength": 0.7, "set_area_to_bounds": False}]  # // 8, as ComfyUI
    share = run("ConditioningSetAreaPercentage", conditioning=placed, width=0.5, height=0.25, x=0.1, y=0.2,
                strength=1.5)
    assert share.items[1].extras == {"area": ("percentage", 0.25, 0.5, 0.2, 0.1), "strength": 1.5,
                                     "set_area_to_bounds": False}
    weighed = run("ConditioningSetAreaStrength", conditioning=share, strength=3.0)
    assert weighed.items[1].extras == {**share.items[1].extras, "strength": 3.0}
    mask = torch.rand(32, 48)
    masked = run("ConditioningSetMask", conditioning=weighed, mask=Mask(mask), strength=0.6,
                 set_cond_area="mask bounds")
    extras = masked.items[1].extras
    assert torch.equal(extras["mask"], mask.unsqueeze(0))  # a 2-D mask gains its batch axis
    assert (extras["set_area_to_bounds"], extras["mask_strength"], extras["strength"]) == (True, 0.6, 3.0)
    default = run("ConditioningSetMask", conditioning=given, mask=Mask(mask[None]), strength=1.0,
                  set_cond_area="default")
    assert default.items[0].extras["set_area_to_bounds"] is False
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(given.items, masked.items))
    assert given.items[1].extras == {}  # the input is not changed


def test_the_nodes_have_comfyuis_inputs_defaults_and_ranges() -> None:
    def specs(class_type: str) -> list[tuple[Any, ...]]:
        return [(s.name, s.type, s.default, s.min, s.max, s.step) for s in catalog()[class_type].input_specs()]

    cond, strength = ("conditioning", "CONDITIONING", None, None, None, None), ("strength", "FLOAT", 1.0, 0.0, 10.0,
                                                                                0.01)
    assert specs("ConditioningSetArea") == [cond, ("width", "INT", 64, 64, 16384, 8),
                                            ("height", "INT", 64, 64, 16384, 8), ("x", "INT", 0, 0, 16384, 8),
                                            ("y", "INT", 0, 0, 16384, 8), strength]
    assert specs("ConditioningSetAreaPercentage") == [cond, ("width", "FLOAT", 1.0, 0.0, 1.0, 0.01),
                                                      ("height", "FLOAT", 1.0, 0.0, 1.0, 0.01),
                                                      ("x", "FLOAT", 0.0, 0.0, 1.0, 0.01),
                                                      ("y", "FLOAT", 0.0, 0.0, 1.0, 0.01), strength]
    assert specs("ConditioningSetAreaStrength") == [cond, strength]
    assert [s[:2] for s in specs("ConditioningSetMask")] == [("conditioning", "CONDITIONING"), ("mask", "MASK"),
                                                             ("strength", "FLOAT"), ("set_cond_area", "COMBO")]
    assert specs("ConditioningSetMask")[2] == strength
    spec = {s.name: s for s in catalog()["ConditioningSetMask"].input_specs()}["set_cond_area"]
    assert list(spec.choices or ()) == ["default", "mask bounds"]
    assert {catalog()[c].CATEGORY for c in ("ConditioningSetArea", "ConditioningSetAreaPercentage",
                                            "ConditioningSetAreaStrength", "ConditioningSetMask")} == {"conditioning"}


# -- sampling, against ComfyUI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 6.0])
def test_two_areas_and_a_whole_picture_prompt_are_comfyuis_weighted_average(cfg: float) -> None:
    assert_matches_comfyui(left_right_full(), conds(flat(NEG)), cfg=cfg)


def test_each_area_gets_a_twin_in_the_negative_and_conds_are_batched_by_shape() -> None:
    unet = SpatialUNet()
    ours(left_right_full(), conds(flat(NEG)), latents(), 2.9, 6.0, unet)
    # the whole: the full prompt and the negative; the halves: both areas and the negative's twin of each
    assert sorted(unet.calls) == [((2, 4, 16, 24), [NEG, FULL]), ((4, 4, 16, 12), [NEG, NEG, LEFT, RIGHT])]


def test_feathering_ramps_only_the_edges_inside_the_picture() -> None:
    left = region(area(flat(1.0), 96, 128, 0, 0), H, W, 1)
    assert left is not None and left.box == (16, 12, 0, 0)
    ramp = [1 / 3, 2 / 3, 1.0]  # min(8, 12 // 4) cells
    assert torch.allclose(left.mult[0, 0, 5], torch.tensor([1.0] * 9 + ramp[::-1]))  # the right edge only
    assert torch.equal(left.mult[0, 0, :, 0], torch.ones(16))  # top, bottom and left are the picture's border
    middle = region(area(flat(1.0), 128, 64, 48, 32), H, W, 1)  # 8 x 16 cells at (4, 6): inside on every side
    assert middle is not None and middle.box == (8, 16, 4, 6)
    rows, cols = middle.mult[0, 0, :, 8], middle.mult[0, 0, 4]
    assert torch.allclose(rows, torch.tensor([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5]))  # min(8, 8 // 4) = 2
    assert torch.allclose(cols, torch.tensor([0.25, 0.5, 0.75] + [1.0] * 10 + [0.75, 0.5, 0.25]))
    assert torch.isclose(middle.mult[0, 0, 0, 0], torch.tensor(0.5 * 0.25))  # corners ramp both ways
    whole = region(area(flat(1.0), 192, 128, 0, 0), H, W, 1)
    assert whole is not None and torch.equal(whole.mult, torch.ones(1, 1, H, W))
    assert_matches_comfyui(conds(area(flat(LEFT), 128, 64, 48, 32), flat(FULL)), conds(flat(NEG)))


def test_an_area_past_the_picture_is_cut_to_it_and_one_starting_outside_is_refused() -> None:
    big = area(flat(LEFT), 4096, 4096, 64, 32)
    cut = region(big, H, W, 1)
    assert cut is not None and cut.box == (12, 16, 4, 8)
    assert_matches_comfyui(conds(big, flat(FULL)), conds(flat(NEG)))
    with pytest.raises(ValueError, match=r"starts at x 200, y 0 \(pixels\), outside the 192x128 picture"):
        ours(conds(area(flat(LEFT), 64, 64, 200, 0)), conds(flat(NEG)), latents(), 2.9, 6.0)


@pytest.mark.parametrize("strength", [0.0, 0.35, 2.5])
def test_strength_weighs_an_area_as_comfyui(strength: float) -> None:
    assert_matches_comfyui(left_right_full(strength), conds(flat(NEG)))
    weighed = run("ConditioningSetAreaStrength", conditioning=conds(flat(FULL)), strength=strength)
    assert_matches_comfyui(conds(flat(LEFT), *weighed.items), conds(flat(NEG)))


def soft_mask(batch: int = 1) -> torch.Tensor:
    """A picture-sized mask: a soft blob right of the middle, at pixel resolution (resized to the latent)."""
    ys, xs = torch.meshgrid(torch.arange(H * 8.0), torch.arange(W * 8.0), indexing="ij")
    blob = (1.0 - ((ys - 60) ** 2 + (xs - 120) ** 2) / 40.0**2).clamp(min=0.0)
    return torch.stack([blob * (1.0 - 0.3 * k) for k in range(batch)])


@pytest.mark.parametrize("set_cond_area", ["default", "mask bounds"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_masked_cond_counts_with_its_mask_as_comfyui(set_cond_area: str, batch: int) -> None:
    masked = run("ConditioningSetMask", conditioning=conds(flat(LEFT)), mask=Mask(soft_mask(batch)), strength=0.8,
                 set_cond_area=set_cond_area)
    difference = assert_matches_comfyui(conds(*masked.items, flat(FULL)), conds(flat(NEG)), scaled=latents(batch))
    assert difference < 1e-5
    found = region(masked.items[0], H, W, batch)
    assert found is not None and found.mult.shape[0] == batch
    if set_cond_area == "mask bounds":  # the box around the resized mask (at least 8 cells a side), no feathering
        resolved = [comfy_cond(masked.items[0])]
        comfy_resolve(resolved, (H, W))
        assert found.box == resolved_area(masked.items[0], H, W) == resolved[0]["area"]
        assert found.box[0] < H and found.box[1] < W
    else:
        assert found.box is None and float(found.mult.amin()) == 0.0


def test_masks_that_do_not_divide_the_batch_are_refused_in_words() -> None:
    masked = run("ConditioningSetMask", conditioning=conds(flat(LEFT)), mask=Mask(soft_mask(2)), strength=1.0,
                 set_cond_area="default")
    with pytest.raises(ValueError, match="holds 2 masks for 3 latents; give one mask, or as many as the latents"):
        ours(conds(*masked.items), conds(flat(NEG)), latents(3), 1.5, 6.0)


def test_an_empty_mask_with_mask_bounds_is_comfyuis_smallest_area_and_counts_nowhere() -> None:
    masked = run("ConditioningSetMask", conditioning=conds(flat(LEFT)), mask=Mask(torch.zeros(1, 64, 64)),
                 strength=1.0, set_cond_area="mask bounds")
    assert resolved_area(masked.items[0], H, W) == (8, 8, 0, 0)
    assert_matches_comfyui(conds(*masked.items, flat(FULL)), conds(flat(NEG)))


def test_percentage_areas_are_resolved_on_the_latent_sampled() -> None:
    share = run("ConditioningSetAreaPercentage", conditioning=conds(flat(LEFT)), width=0.5, height=0.15625, x=0.25,
                y=0.03125, strength=1.0).items[0]
    # 0.15625 * 16 = 2.5 and 0.03125 * 16 = 0.5 round half to even, as Python's round in ComfyUI
    assert resolved_area(share, 16, 24) == (2, 12, 0, 6)
    assert resolved_area(share, 32, 48) == (5, 24, 1, 12)
    tiny = run("ConditioningSetAreaPercentage", conditioning=conds(flat(LEFT)), width=0.0, height=0.0, x=0.0, y=0.0,
               strength=1.0).items[0]
    assert resolved_area(tiny, 16, 24) == (1, 1, 0, 0)  # at least a cell
    half = run("ConditioningSetAreaPercentage", conditioning=conds(flat(LEFT)), width=0.5, height=0.75, x=0.25, y=0.125,
               strength=1.0)
    for height, width in ((H, W), (24, 16)):
        assert_matches_comfyui(conds(*half.items, flat(FULL)), conds(flat(NEG)), scaled=latents(1, height, width))


def test_a_negative_area_gets_a_twin_in_the_positive_and_an_area_inside_another_takes_its_text() -> None:
    inner = area(flat(RIGHT), 64, 64, 112, 32)  # inside the right half
    positive = conds(area(flat(LEFT), 96, 128, 0, 0), area(flat(FULL), 96, 128, 96, 0), inner)
    negative = conds(flat(NEG), area(flat(0.25), 96, 128, 96, 0))  # the right half's own negative
    unet = SpatialUNet()
    ours(positive, negative, latents(), 2.9, 6.0, unet)
    # the inner area's twin carries the right half's negative (the smallest that holds it), not the whole one's;
    # the right half has its own negative, so it gets no twin
    assert sorted(v for s, v in unet.calls if s[2:] == (8, 8)) == [[0.25, RIGHT]]
    assert_matches_comfyui(positive, negative)


@pytest.mark.parametrize("sigma", [14.6, 0.93])
def test_a_timestep_range_on_an_area_cond_leaves_it_and_its_twin_out_of_the_steps_outside(sigma: float) -> None:
    late = run("ConditioningSetTimestepRange", conditioning=conds(area(flat(LEFT), 96, 128, 0, 0)), start=0.5,
               end=1.0).items[0]
    positive = conds(late, area(flat(RIGHT), 96, 128, 96, 0), flat(FULL))
    unet = SpatialUNet()
    ours(positive, conds(flat(NEG)), latents(), sigma, 6.0, unet)
    halves = sorted(v for s, v in unet.calls if s[3] == 12)
    assert halves == ([[NEG, RIGHT]] if sigma > comfy_percent_to_sigma(0.5) else [[NEG, NEG, LEFT, RIGHT]])
    assert_matches_comfyui(positive, conds(flat(NEG)), sigma=sigma)


def test_the_queues_groups_each_get_their_own_areas() -> None:
    # two jobs in one UNet batch give each job its solo estimate
    first, second = (left_right_full(), conds(flat(NEG))), (conds(flat(FULL)), conds(flat(NEG)))
    scaled = latents(3)
    eps = guided_eps(SpatialUNet(), [first[0], second[0]], [first[1], second[1]], 6.0, False, PIXELS, sizes=[1, 2])
    together = eps(scaled, torch.tensor([500.0]), torch.tensor(2.9))
    alone = [guided_eps(SpatialUNet(), *pair, 6.0, False, PIXELS)(part, torch.tensor([500.0]), torch.tensor(2.9))
             for pair, part in zip((first, second), scaled.split([1, 2]))]
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


def test_plain_conds_give_exactly_what_they_gave_before_areas() -> None:
    # no area keys: the mean of the conds' predictions, bit for bit
    scaled, sigma = latents(), 2.9
    unet = SpatialUNet()
    got = guided_eps(unet, conds(flat(LEFT), flat(FULL)), conds(flat(NEG)), 6.0, False, PIXELS)(
        scaled, torch.tensor([500.0]), torch.tensor(sigma))
    preds = [SpatialUNet.predict(scaled, torch.tensor([v])) for v in (LEFT, FULL, NEG)]
    cond, uncond = torch.stack(preds[:2]).mean(0), preds[2]
    assert torch.equal(got, uncond + (cond - uncond) * 6.0)
    assert unet.calls == [((3, 4, H, W), [NEG, LEFT, FULL])]
