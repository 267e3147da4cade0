"""Emphasis syntax, A1111's rules."""

from __future__ import annotations

import pytest

from prompts import Fragment, PromptError, parse_weighted
from prompts.emphasis import MAX_NESTING


def pairs(text: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 6)) for f in parse_weighted(text) if not f.is_break]


def test_plain_text_is_one_fragment_at_one() -> None:
    assert parse_weighted("normal text") == [Fragment("normal text", 1.0)]


def test_empty_text_has_no_fragments() -> None:
    assert parse_weighted("") == []


def test_round_brackets_multiply_by_1_1_and_nest() -> None:
    assert pairs("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert pairs("((x))") == [("x", 1.21)]
    assert pairs("(((x)))") == [("x", 1.331)]


def test_square_brackets_divide_by_1_1() -> None:
    assert pairs("[x]") == [("x", round(1 / 1.1, 6))]
    assert pairs("[[x]]") == [("x", round(1 / 1.21, 6))]


def test_explicit_weight_sets_the_group_and_multiplies_with_outer_brackets() -> None:
    assert pairs("(x:1.3)") == [("x", 1.3)]
    assert pairs("(x: 0.5 )") == [("x", 0.5)]
    assert pairs("(x:-1)") == [("x", -1.0)]
    assert pairs("(a (b:1.5))") == [("a ", 1.1), ("b", 1.65)]  # A1111 multiplies; ComfyUI would say 1.5


def test_a1111_docstring_example() -> None:
    got = pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert got == [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                   (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]


def test_escaped_brackets_are_literal() -> None:
    assert parse_weighted(r"\(literal\]") == [Fragment("(literal]", 1.0)]
    assert parse_weighted(r"smile \(face\)") == [Fragment("smile (face)", 1.0)]
    assert pairs(r"a\\(b)") == [("a\\", 1.0), ("b", 1.1)]  # escaped backslash, then a real group


def test_lone_backslash_and_colons_stay_text() -> None:
    assert parse_weighted(r"C:\path \_/") == [Fragment(r"C:\path \_/", 1.0)]
    assert pairs("(a:b)") == [("a:b", 1.1)]
    assert pairs("embedding:foo") == [("embedding:foo", 1.0)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", round(1 / 1.1, 6))]),
        ("stray) close]", [("stray) close]", 1.0)]),
        ("a:1.2) b", [("a:1.2) b", 1.0)]),  # a weight with nothing open is text
        ("(x:1.2.3)", [("x:1.2.3", 1.1)]),  # not a number: text, and the bracket is a plain group
        ("([a)b]", [("a", 1.0), ("b", round(1 / 1.1, 6))]),  # crossing brackets, as A1111
    ],
)
def test_unbalanced_and_malformed_brackets_are_tolerated(text: str, expected: list[tuple[str, float]]) -> None:
    assert pairs(text) == expected


def test_adjacent_groups_of_equal_weight_merge() -> None:
    assert pairs("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]


def test_break_is_an_upper_case_word() -> None:
    fragments = parse_weighted("a cat BREAK a dog")
    assert [f.is_break for f in fragments] == [False, True, False]
    assert [f.text for f in fragments if not f.is_break] == ["a cat", "a dog"]
    assert all(not f.is_break for f in parse_weighted("a break, xBREAK, BREAKS, Break"))


def test_break_inside_brackets_still_breaks() -> None:
    fragments = parse_weighted("(a BREAK b)")
    assert [(f.text, f.weight, f.is_break) for f in fragments] == [("a", 1.1, False), ("BREAK", 1.0, True),
                                                                   ("b", 1.1, False)]


def test_leading_and_repeated_breaks_make_no_empty_chunks() -> None:
    assert [f.is_break for f in parse_weighted("BREAK a BREAK BREAK b")] == [False, True, False]


def test_weights_outside_the_allowed_range_are_a_prompt_error() -> None:
    with pytest.raises(PromptError, match=r"emphasis weight 999999999999… \(400 characters\) on 'x' is outside "
                                          r"-100 to 100"):
        parse_weighted("(x:" + "9" * 400 + ")")
    with pytest.raises(PromptError, match="brackets nest 8000 deep here; at most 64"):
        parse_weighted("(" * 8000 + "x")


def test_deep_nesting_is_refused_in_one_pass() -> None:
    # 3,000 closed pairs: the sweep stays linear, and the depth is refused before any weight is multiplied
    with pytest.raises(PromptError, match="nest 3000 deep"):
        parse_weighted("(" * 3000 + "x" + ")" * 3000 + " y")
    fragments = parse_weighted("[" * MAX_NESTING + "x" + "]" * MAX_NESTING + " y")
    assert fragments[0].text == "x" and fragments[0].weight == pytest.approx(1.1 ** -MAX_NESTING, rel=1e-9)
