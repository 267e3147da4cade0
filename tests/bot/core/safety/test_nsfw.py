"""The NSFW scorer on the real open_nsfw model: a synthetic image it scores high, noise it scores low, bad files.

`HIGH` was found by hill climbing against this classifier (an 8x8 grid of colours, each step nudging a quarter of
the cells at random and keeping the change when the score rose; 5500 steps from a flat skin tone, about 45 s),
then rounded to whole colours. Shown at 256 px (bicubic) it scores about 0.80: enough to exercise every path a
result over the threshold takes, without any real picture in the repository.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.core.safety.nsfw import NsfwScorer, UnreadableImage

HIGH = [
    [(201, 89, 98), (198, 116, 84), (164, 111, 87), (190, 101, 86), (214, 124, 71), (211, 142, 133), (166, 146, 131), (198, 134, 108)],
    [(249, 123, 141), (171, 120, 145), (202, 131, 100), (178, 131, 94), (192, 149, 122), (206, 138, 136), (189, 163, 83), (214, 112, 129)],
    [(198, 134, 108), (175, 140, 103), (185, 141, 158), (198, 134, 108), (191, 121, 117), (194, 134, 117), (198, 134, 108), (176, 148, 75)],
    [(192, 88, 117), (196, 155, 113), (198, 134, 108), (198, 134, 108), (198, 134, 108), (160, 71, 76), (198, 127, 116), (191, 111, 110)],
    [(192, 126, 76), (185, 132, 133), (185, 135, 96), (198, 134, 108), (198, 134, 108), (198, 134, 108), (198, 134, 108), (200, 135, 109)],
    [(173, 108, 97), (207, 146, 121), (198, 133, 82), (173, 136, 93), (191, 138, 104), (198, 134, 108), (218, 152, 131), (212, 149, 114)],
    [(213, 152, 114), (180, 152, 128), (192, 135, 100), (183, 129, 112), (206, 115, 131), (198, 134, 108), (193, 165, 108), (175, 153, 95)],
    [(166, 166, 124), (218, 153, 137), (165, 136, 104), (187, 123, 102), (171, 135, 98), (165, 150, 86), (217, 136, 123), (192, 106, 152)]
]


def high_image() -> Image.Image:
    return Image.fromarray(np.array(HIGH, dtype=np.uint8)).resize((256, 256), Image.BICUBIC)


@pytest.fixture(scope="module")
def scorer() -> NsfwScorer:
    return NsfwScorer()


def test_the_synthetic_image_scores_high_and_noise_low(scorer: NsfwScorer) -> None:
    assert scorer.score(high_image()) > 0.75
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    assert scorer.score(noise) < 0.05


async def test_files_are_scored_off_the_event_loop(scorer: NsfwScorer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "high.png"
    high_image().save(path)
    loop_thread = threading.get_ident()
    threads = []
    original = scorer.score

    def score(image: Path | Image.Image) -> float:
        threads.append(threading.get_ident())
        return original(image)

    monkeypatch.setattr(scorer, "score", score)
    [value] = await scorer.score_files([path])
    assert value > 0.75
    assert threads and loop_thread not in threads
    assert await asyncio.wait_for(scorer.score_files([]), 5) == []


def test_a_file_that_is_no_image_is_refused_by_name(scorer: NsfwScorer, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UnreadableImage, match="broken.png could not be read as an image"):
        scorer.score(broken)
