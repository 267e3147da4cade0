"""Wildcards: `{a|b}` options and `__name__` files, reproducible for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompts import PromptError, available_wildcards, resolve_wildcards
from prompts.wildcards import DEFAULT_WILDCARDS


def test_shipped_examples_are_listed() -> None:
    assert available_wildcards() == ["animals", "colors"]


def test_same_seed_same_prompt() -> None:
    text = "a {red|green|blue} {big {fat|thin}|small} __animals__ under a __colors__ sky"
    assert len({resolve_wildcards(text, 1234) for _ in range(5)}) == 1


def test_seeds_vary_the_draw_and_only_offer_the_options() -> None:
    results = {resolve_wildcards("{red|green|blue}", seed) for seed in range(60)}
    assert results == {"red", "green", "blue"}


def test_nested_options_resolve_fully() -> None:
    for seed in range(30):
        out = resolve_wildcards("x {a {b|c}|d} y", seed)
        assert out in {"x a b y", "x a c y", "x d y"}


def test_file_wildcards_draw_a_line_and_skip_comments() -> None:
    colors = [line for line in (DEFAULT_WILDCARDS / "colors.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    draws = {resolve_wildcards("__colors__", seed) for seed in range(80)}
    assert draws <= set(colors) and len(draws) > 3


def test_wildcard_lines_may_hold_options_and_wildcards(tmp_path: Path) -> None:
    (tmp_path / "pet.txt").write_text("{tabby|black} cat\n__size__ dog\n")
    (tmp_path / "size.txt").write_text("tiny\n")
    draws = {resolve_wildcards("__pet__", seed, tmp_path) for seed in range(40)}
    assert draws == {"tabby cat", "black cat", "tiny dog"}


def test_unknown_wildcard_lists_the_available_ones() -> None:
    with pytest.raises(PromptError, match=r"__anmals__.*closest: animals.*__animals__, __colors__"):
        resolve_wildcards("a __anmals__", 1)


def test_self_reference_stops_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "loop.txt").write_text("again __loop__\n")
    with pytest.raises(PromptError, match="nest deeper"):
        resolve_wildcards("__loop__", 1, tmp_path)


def test_empty_wildcard_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(PromptError, match="no lines"):
        resolve_wildcards("__empty__", 1, tmp_path)


def test_escapes_unmatched_braces_and_other_text_stay() -> None:
    text = r"\{not|options\} {unclosed | bar ____ __ \(kept\) a_b"
    assert resolve_wildcards(text, 7) == r"{not|options} {unclosed | bar ____ __ \(kept\) a_b"


def test_names_cannot_leave_the_folder(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("hidden\n")
    inner = tmp_path / "wild"
    inner.mkdir()
    assert resolve_wildcards("__../secret__", 1, inner) == "__../secret__"  # not wildcard syntax


def test_unreadable_wildcard_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptError, match="UTF-8"):
        resolve_wildcards("__latin__", 1, tmp_path)
