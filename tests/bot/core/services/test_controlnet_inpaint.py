"""/imagine with a ControlNet and with a transparent upload (inpaint), on the real engine and the tiny models:
the graph it becomes, what the card says, what rerolls and variations keep, and the refusals."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bot.core.cards.result import result_card
from bot.core.errors import RequestInvalid
from bot.core.front_end import Requester
from bot.core.requests.imagine import ImageUpload
from tests.bot.conftest import Env
from tests.bot.core.services.test_generations import _refused as refused_request

CONTROLNET = "tiny-controlnet-sd15.safetensors"


def _png(width: int = 64, height: int = 64, *, alpha: np.ndarray | None = None) -> bytes:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 2:] = (230, 230, 230)  # a vertical edge for the ControlNet (and Canny) to see
    image = Image.fromarray(pixels)
    if alpha is not None:
        image.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _upload(data: bytes, filename: str = "hint.png", content_type: str | None = "image/png") -> ImageUpload:
    return ImageUpload(filename=filename, content_type=content_type, data=data)


def _fields(generation) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(result_card(generation).fields)


async def test_a_control_image_runs_through_the_controlnet_and_rerolls_and_variations_keep_it(env: Env) -> None:
    final = await env.run({"prompt": "a house", "seed": 3, "control_image": _upload(_png()),
                           "controlnet": "tiny-controlnet-sd15", "control_strength": 0.8})
    assert final.kind == "done" and final.error is None
    first = final.generation
    workflow = first.workflow
    assert workflow["22"] == {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    apply = workflow["23"]["inputs"]
    assert workflow["23"]["class_type"] == "ControlNetApplyAdvanced" and apply["strength"] == 0.8
    assert apply["positive"] == ["6", 0] and apply["negative"] == ["7", 0] and apply["image"] == ["20", 0]
    assert workflow["3"]["inputs"]["positive"] == ["23", 0] and workflow["3"]["inputs"]["negative"] == ["23", 1]
    assert "21" not in workflow  # not a canny ControlNet by its name: the image goes in as given
    assert (env.settings.engine.input_dir / workflow["20"]["inputs"]["image"]).is_file()
    assert _fields(first)["ControlNet"] == "tiny-controlnet-sd15 · strength 0.8 · control image as given"
    assert first.request["control_image"]["filename"] == "hint.png"  # described, never the bytes

    reroll = (await env.finish(await env.studio.generations.reroll(first.id, Requester("42", "777")))).generation
    assert reroll.state == "done"
    assert {node for node in workflow if workflow[node] != reroll.workflow[node]} == {"3", "9"}  # seed, file name
    # the control image comes from the cache (models may be unloaded between runs when memory is short)
    assert "20" in reroll.cached

    variation = (await env.finish(await env.studio.generations.variation(first.id, Requester("42", "777"))))
    assert variation.generation.state == "done"
    assert variation.generation.workflow["20"] == workflow["20"] and variation.generation.workflow["3"]["inputs"][
        "positive"] == ["23", 0]


async def test_control_canny_edge_detects_the_control_image_first(env: Env) -> None:
    final = await env.run({"prompt": "a house", "seed": 3, "control_image": _upload(_png()),
                           "controlnet": "tiny-controlnet-sd15", "control_canny": True})
    assert final.kind == "done", final.error
    canny = final.generation.workflow["21"]
    assert canny == {"class_type": "Canny", "inputs": {"image": ["20", 0], "low_threshold": 0.4,
                                                       "high_threshold": 0.8}}
    assert final.generation.workflow["23"]["inputs"]["image"] == ["21", 0]
    assert _fields(final.generation)["ControlNet"].endswith("canny edges of the control image")


async def test_an_upload_with_transparency_inpaints_its_transparent_area(env: Env) -> None:
    alpha = np.full((68, 76), 255, dtype=np.uint8)  # not multiples of 8: VAEEncode crops, the mask is resized
    alpha[16:48, 16:48] = 0  # a hole to fill
    final = await env.run({"prompt": "a window", "seed": 5, "image": _upload(_png(76, 68, alpha=alpha), "hole.png"),
                           "width": None, "height": None})
    assert final.kind == "done", final.error
    workflow = final.generation.workflow
    assert workflow["15"] == {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["13", 0],
                                                                             "mask": ["12", 1]}}
    assert workflow["3"]["inputs"]["latent_image"] == ["15", 0]
    assert workflow["3"]["inputs"]["denoise"] == env.settings.bot.img2img_denoise  # the denoise is kept
    assert "inpaint" in _fields(final.generation)["Size"] and final.generation.params["inpaint"] is True


async def test_an_upload_whose_alpha_is_opaque_everywhere_stays_img2img(env: Env) -> None:
    final = await env.run({"prompt": "a window", "seed": 5,
                           "image": _upload(_png(alpha=np.full((64, 64), 255, dtype=np.uint8))),
                           "width": None, "height": None})
    assert final.kind == "done", final.error
    workflow = final.generation.workflow
    assert "15" not in workflow and workflow["3"]["inputs"]["latent_image"] == ["13", 0]
    assert _fields(final.generation)["Size"].startswith("64×64 · img2img")


async def _refused(env: Env, options: dict) -> str:
    """Options that must be refused (at 4 steps), checked to change nothing; the message."""
    return await refused_request(env, {"steps": 4, **options})


async def test_bad_control_input_gets_a_clear_message_and_changes_nothing(env: Env) -> None:
    hint = _upload(_png())
    unknown = await _refused(env, {"control_image": hint, "controlnet": "tiny-controlnet-sd16"})
    assert "ControlNet 'tiny-controlnet-sd16' is not in models/controlnet; closest: 'tiny-controlnet-sd15" in unknown
    gif = await _refused(env, {"control_image": _upload(b"GIF89a text", "a.gif", None), "controlnet": CONTROLNET})
    assert gif.startswith("control_image: 'a.gif'") and "PNG, JPEG or WebP" in gif
    pdf = await _refused(env, {"control_image": _upload(b"%PDF", "a.pdf", "application/pdf"), "controlnet": CONTROLNET})
    assert "control_image: 'a.pdf' is application/pdf, not an image Noodle decodes" in pdf
    huge = await _refused(env, {"control_image": _upload(b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024)),
                                "controlnet": CONTROLNET})
    assert huge.startswith("control_image: 'hint.png' is 22.0 MB; the limit is")
    side = env.settings.limits.max_side
    too_big = await _refused(env, {"control_image": _upload(_png(side + 8, 64)), "controlnet": CONTROLNET})
    assert too_big.startswith("control_image:") and str(side) in too_big
    strong = await _refused(env, {"control_image": hint, "controlnet": CONTROLNET, "control_strength": 2.5})
    assert "control_strength 2.5 is outside 0..2" in strong
    assert "control_image needs a ControlNet" in await _refused(env, {"control_image": hint})
    assert "needs a control image: attach one with control_image:" in await _refused(env, {"controlnet": CONTROLNET})
    assert "control_strength applies to a ControlNet" in await _refused(env, {"control_strength": 1.0})


async def test_an_sdxl_controlnet_on_an_sd15_checkpoint_is_refused_before_queueing(env: Env) -> None:
    message = await _refused(env, {"control_image": _upload(_png()), "controlnet": "tiny-controlnet-sdxl",
                                   "model": "tiny-sd15"})
    assert message == ("ControlNet 'tiny-controlnet-sdxl.safetensors' is for SDXL checkpoints and tiny-sd15 is "
                       "SD1.x; pick a ControlNet made for SD1.x (/models lists each one's family) or another model")


async def test_models_lists_controlnets_with_their_family_and_the_upscalers(env: Env) -> None:
    text = await env.studio.models.text()
    assert ("ControlNets (/imagine controlnet:): tiny-controlnet-sd15.safetensors (SD1.x), "
            "tiny-controlnet-sdxl.safetensors (SDXL)") in text
    upscalers = env.engine.choices("upscale_models")
    assert upscalers and f"Upscale models (for /workflow): {', '.join(upscalers)}" in text
    # the tiny models folder has no hypernetworks: the line says where they go
    assert "Hypernetworks (for /workflow): none (put .safetensors files in models/hypernetworks)" in text
    assert "GLIGEN models (for /workflow): none (put .safetensors files in models/gligen)" in text
    assert "CLIP vision models (for /workflow): none (put .safetensors files in models/clip_vision)" in text


async def test_a_reroll_whose_control_image_is_gone_says_to_attach_it_again(env: Env) -> None:
    first = (await env.run({"prompt": "a house", "control_image": _upload(_png()),
                            "controlnet": CONTROLNET})).generation
    (env.settings.engine.input_dir / first.workflow["20"]["inputs"]["image"]).unlink()
    try:
        await env.studio.generations.reroll(first.id, Requester("42", "777"))
    except RequestInvalid as err:
        assert "control image of #" in str(err) and "control_image:" in str(err)
    else:
        raise AssertionError("the reroll was queued without its control image")
