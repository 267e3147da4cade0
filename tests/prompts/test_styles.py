"""Named styles from TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompts import PromptError, Style, apply_style, load_styles


def test_shipped_styles_load() -> None:
    styles = load_styles()
    assert 4 <= len(styles) <= 6
    for name, style in styles.items():
        assert style.name == name and "{prompt}" in style.prompt and style.negative and style.description


def test_apply_puts_the_prompt_into_the_template_and_adds_the_negative() -> None:
    prompt, negative = apply_style("cinematic", "a red fox", "blurry")
    assert prompt.startswith("cinematic film still of a red fox, ")
    assert negative.startswith("blurry, ") and "cartoon" in negative


def test_empty_negative_gets_just_the_style() -> None:
    styles = {"s": Style("s", "{prompt}, oil", "ugly")}
    assert apply_style("s", "cat", "", styles) == ("cat, oil", "ugly")


def test_template_without_placeholder_is_appended() -> None:
    styles = {"s": Style("s", "film grain", "")}
    assert apply_style("s", "cat", "dog", styles) == ("cat, film grain", "dog")


def test_unknown_style_names_the_closest() -> None:
    with pytest.raises(PromptError, match=r"'cinematc' is not defined; closest: cinematic"):
        apply_style("cinematc", "x", "")


def test_bad_files_are_prompt_errors_with_the_path(tmp_path: Path) -> None:
    bad = tmp_path / "styles.toml"
    bad.write_text("[a\nprompt = 1")
    with pytest.raises(PromptError, match="not valid TOML"):
        load_styles(bad)
    bad.write_text('[a]\nprompt = "{prompt}"\nnegativ = "typo"\n')
    with pytest.raises(PromptError, match="unknown key"):
        load_styles(bad)
    bad.write_text('[a]\nnegative = "x"\n')
    with pytest.raises(PromptError, match="no prompt template"):
        load_styles(bad)
    with pytest.raises(PromptError, match="cannot read"):
        load_styles(tmp_path / "missing.toml")
