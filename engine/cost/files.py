"""What the cost check (engine/cost/) reads beside the graph, without running a node: an input image's size
from its header, an upscale model's scale from its tensor shapes, a prompt's chunk count from the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from engine.errors import NoodleError
from engine.images_io import ALLOWED_FORMATS
from engine.models.upscale import read_spec
from engine.settings import Limits
from prompts.embeddings import EmbeddingLibrary
from prompts.errors import PromptError
from prompts.plan import Syntax, plan_prompt

__all__ = ["Files", "ModelFiles"]

_ORIENTATION = 0x0112  # EXIF orientations 5 to 8 turn the picture a quarter: LoadImage swaps its sides


class ModelFiles(Protocol):
    """What validation and the cost need of the model manager: folder listings, files, embeddings."""

    def choices(self, folder: str) -> list[str]: ...

    def resolve(self, folder: str, name: str) -> Path: ...

    @property
    def embeddings(self) -> EmbeddingLibrary: ...


class Files:
    """What `check_cost` reads beside the graph, each file and text once: input images' headers, prompts' chunks."""

    def __init__(self, models: ModelFiles, limits: Limits, syntax: Syntax = "noodle") -> None:
        self.models, self.limits, self.syntax = models, limits, syntax
        self.sizes: dict[str, tuple[int, int] | None] = {}
        self.chunks: dict[str, int] = {}
        self.scales: dict[str, int | None] = {}
        self._embeddings: EmbeddingLibrary | None = None

    def image_size(self, name: str) -> tuple[int, int] | None:
        """An input image's size once upright; None when it does not open (LoadImage says why when it runs)."""
        if name not in self.sizes:
            try:
                self.sizes[name] = _header_size(self.models.resolve("input", name), self.limits)
            except NoodleError:
                self.sizes[name] = None
        return self.sizes[name]

    def upscale_factor(self, name: str) -> int | None:
        """An upscale model's scale from its header; None when it does not load (UpscaleModelLoader says why)."""
        if name not in self.scales:
            try:
                self.scales[name] = read_spec(self.models.resolve("upscale_models", name), name).scale
            except NoodleError:
                self.scales[name] = None
        return self.scales[name]

    def text_chunks(self, text: str) -> int:
        """The 75-token chunks a prompt is encoded in, after the max_prompt_chunks cut."""
        if text not in self.chunks:
            if self._embeddings is None:
                self._embeddings = self.models.embeddings
            try:
                count = plan_prompt(text, embeddings=self._embeddings, max_chunks=self.limits.max_prompt_chunks,
                                    syntax=self.syntax).report.chunks
            except PromptError:  # its encode refuses it with this message when the job runs; bound it meanwhile
                count = self.limits.max_prompt_chunks
            self.chunks[text] = count
        return self.chunks[text]


def _header_size(path: Path, limits: Limits) -> tuple[int, int] | None:
    """An image file's size once upright, from its header and EXIF; None if it is not an image LoadImage takes."""
    try:
        with Image.open(path, formats=ALLOWED_FORMATS) as opened:
            width, height = opened.size
            if width * height > limits.max_pixels:
                return width, height  # refused by its size whichever way up: no need to look further
            # a PNG may keep its EXIF after the pixels, which Pillow then decodes to reach (at most max_pixels)
            return (height, width) if opened.getexif().get(_ORIENTATION) in (5, 6, 7, 8) else (width, height)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
