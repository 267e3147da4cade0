"""Upscale models (ComfyUI's `models/upscale_models/`): ESRGAN's RRDBNet and Real-ESRGAN's compact SRVGGNet.

Why our own architectures instead of spandrel, which ComfyUI's UpscaleModelLoader uses: spandrel depends on
torchvision and imports it as it is imported (`spandrel/__init__` builds its registry, whose LaMa and
RestoreFormer architectures import torchvision at module level), and no torchvision build imports with the CPU
torch 2.13 Noodle runs on (0.28 and 0.29 both fail to load their own operators), so on such a machine spandrel
cannot even be imported, and a GPU-only dependency would make CPU servers lose upscaling.
The files people actually have come from two families, both plain convolutions that need nothing but torch:

- ESRGAN's RRDBNet (ESRGAN, BSRGAN, Real-ESRGAN x4plus / x2plus / anime_6B, most "4x-..." community models),
  stored in three key layouts: the old ESRGAN one (`model.0.weight`, `model.1.sub.N.RDB1.conv1.0.weight`),
  Real-ESRGAN/BasicSR's (`conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`) and BSRGAN's
  (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`);
- Real-ESRGAN's compact SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3, "2x-..." compact models):
  `body.N.weight`.

So Noodle has its own small implementations of both (rrdb.py, compact.py: 130 lines together, written from
the papers' structure and the files' keys), reads the hyperparameters (scale, blocks, feature width, in/out
channels) from the tensor shapes (detect.py), and tiles the image the way ComfyUI's ImageUpscaleWithModel does
(tiling.py). Files of other spandrel architectures (SwinIR, HAT, DAT, OmniSR ...) are refused with a message
saying what their keys look like.
"""

from __future__ import annotations

from engine.models.upscale.detect import UpscalerSpec, build_module, detect, to_canonical
from engine.models.upscale.loading import UpscaleModel, load_upscaler, read_spec, upscaler_key
from engine.models.upscale.tiling import tile_steps, tiled_upscale, upscale_image

__all__ = ["UpscaleModel", "UpscalerSpec", "build_module", "detect", "load_upscaler", "read_spec", "tile_steps",
           "tiled_upscale", "to_canonical", "upscale_image", "upscaler_key"]
