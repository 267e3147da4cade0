"""/tokens counts what is encoded: one draw of a prompt's {a|b} choices and __wildcards__, never their syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.errors import RequestInvalid
from bot.core.requests.tokens import token_text
from prompts.plan import token_report
from prompts.wildcards import resolve_wildcards


def test_choices_and_wildcards_are_counted_as_one_draw(tmp_path: Path) -> None:
    text = "a {red|green|blue|yellow|orange} __animals__ fox"
    shown = token_text(text, tmp_path)
    drawn = resolve_wildcards(text, 0)
    assert shown.splitlines()[0].startswith(f"{token_report(drawn).tokens}/75 tokens")  # the syntax counted 16
    assert shown.splitlines()[-1] == f"counted for one draw of its choices and wildcards: {drawn}"
    assert "draw" not in token_text("a red fox", tmp_path)


def test_a_lone_surrogate_is_said_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(RequestInvalid, match="lone UTF-16 surrogate"):
        token_text("a red \ud800 fox", tmp_path)
