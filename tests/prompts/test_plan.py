"""Chunking and the token report."""

from __future__ import annotations

import pytest

from prompts import CHUNK_TOKENS, TokenReport, count_tokens, plan_prompt, token_report
from prompts.chunks import Chunk, Unit, split_chunks


def words(n: int) -> str:
    return " ".join(["cat"] * n)  # "cat" is one token


def test_short_prompt_is_one_chunk() -> None:
    report = token_report("a photo of a cat")
    assert (report.tokens, report.chunks, report.chunk_tokens) == (5, 1, [5])


def test_104_tokens_make_two_chunks() -> None:
    report = token_report(words(104))
    assert (report.tokens, report.chunks, report.chunk_tokens) == (104, 2, [75, 29])


def test_exactly_75_tokens_fit_one_chunk() -> None:
    assert token_report(words(75)).chunk_tokens == [75]
    assert token_report(words(76)).chunk_tokens == [75, 1]


def test_a_word_moves_whole_to_the_next_chunk() -> None:
    long_word = "photorealistic,masterpiece"
    size = count_tokens(long_word)
    assert size >= 3
    report = token_report(words(74) + " " + long_word)
    assert report.chunk_tokens == [74, size]


def test_a_word_longer_than_a_chunk_fills_and_runs_on() -> None:
    huge = "a," * 50  # one whitespace-free word of 100 tokens
    assert count_tokens(huge) == 100
    assert token_report("cat " + huge).chunk_tokens == [75, 26]


def test_break_starts_a_new_chunk() -> None:
    report = token_report("a cat BREAK a dog")
    assert report.chunk_tokens == [2, 2]
    assert token_report(words(75) + " BREAK a dog").chunk_tokens == [75, 2]  # no empty chunk between


def test_empty_prompt_is_one_empty_chunk() -> None:
    assert token_report("").chunk_tokens == [0]


def test_lora_tags_are_reported_not_counted() -> None:
    report = token_report("a cat <lora:detail:0.8:0.5>")
    assert report.tokens == 2
    assert report.loras == [{"name": "detail", "unet_weight": 0.8, "clip_weight": 0.5}]


def test_syntax_is_not_counted() -> None:
    assert token_report("(a:1.3) [photo] of ((a)) cat").tokens == 5


def test_cap_cuts_whole_chunks_and_says_so() -> None:
    report = token_report(words(160), max_chunks=2)
    assert (report.tokens, report.chunks, report.chunk_tokens, report.truncated) == (160, 2, [75, 75], 10)
    assert "limit is 2" in report.warnings[0] and "10 tokens were cut" in report.warnings[0]
    assert report.to_dict()["truncated"] == 10
    assert len(plan_prompt(words(160), max_chunks=2).chunks) == 2


def test_no_cap_no_truncation_key() -> None:
    data = token_report(words(160)).to_dict()
    assert data == {"tokens": 160, "chunks": 3, "chunk_tokens": [75, 75, 10], "embeddings": [], "loras": [],
                    "warnings": []}


def test_bad_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_chunks"):
        token_report("x", max_chunks=0)


def test_report_is_frozen() -> None:
    report = TokenReport(1, 1, [1])
    with pytest.raises(AttributeError):
        report.tokens = 2  # type: ignore[misc]


def test_chunk_ids_and_weights_are_77_long() -> None:
    chunk = split_chunks([[Unit(320, 1.2), Unit(-1, 1.0, ("emb", 0))]])[0]
    assert chunk.input_ids(49406, 49407, 0, placeholder=7) == [49406, 320, 7, 49407] + [0] * 73
    assert chunk.full_weights() == [1.0, 1.2] + [1.0] * 75
    assert chunk.weighted and not Chunk((1,), (1.0,)).weighted
    assert len(chunk.input_ids(49406, 49407, 49407)) == CHUNK_TOKENS + 2
