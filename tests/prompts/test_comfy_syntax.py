"""`prompt_syntax = "comfy"`: prompt text read as ComfyUI 0.3.64 reads it, token for token and weight for weight.

`comfy_tokens` below is comfy/sd1_clip.py's escape_important, parse_parentheses, token_weights and
SDTokenizer.tokenize_with_weights (max_word_length 8, 77-token batches), rewritten compactly as a reference, with
the same shipped CLIP tokenizer and a name -> vector count table standing in for the embeddings folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prompts import EmbeddingLibrary, PromptError, clip_tokenizer, count_tokens, plan_prompt, token_report
from prompts.comfy_emphasis import parse_comfy
from prompts.chunks import EMBEDDING_SLOT

# --- the reference ------------------------------------------------------------------------------------------


def _parse_parentheses(string: str) -> list[str]:
    result, current, nesting = [], "", 0
    for char in string:
        if char == "(":
            if nesting == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            nesting += 1
        elif char == ")":
            nesting -= 1
            if nesting == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def _token_weights(string: str, current: float) -> list[tuple[str, float]]:
    out = []
    for item in _parse_parentheses(string):
        weight = current
        if len(item) >= 2 and item[-1] == ")" and item[0] == "(":
            item = item[1:-1]
            colon = item.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    weight = float(item[colon + 1:])
                    item = item[:colon]
                except ValueError:
                    pass
            out += _token_weights(item, weight)
        else:
            out.append((item, current))
    return out


def comfy_tokens(text: str, embeddings: dict[str, int] | None = None) -> list[list[tuple[object, float]]]:
    """ComfyUI's batches of (token, weight), start/end/padding left out; an embedding vector is ("emb", name, row)."""
    tokenizer = clip_tokenizer()
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    groups: list[list[tuple[object, float]]] = []
    for segment, weight in _token_weights(text, 1.0):
        segment = segment.replace("\0\1", ")").replace("\0\2", "(")
        split = __import__("re").split(" embedding:|\nembedding:", segment)
        pieces = [x for x in [split[0]] + [f"embedding:{s}" for s in split[1:]] if x != ""]
        for word in pieces:
            if word.startswith("embedding:") and embeddings is not None:
                parts = word[len("embedding:"):].strip("\n").split()
                name, leftover = parts[0], " ".join(parts[1:])
                found = embeddings.get(name)
                if found is None and len(stripped := name.strip(",")) < len(name):
                    found, leftover = embeddings.get(stripped), f"{name[len(stripped):]} {leftover}"
                    name = stripped
                if found is not None:
                    groups.append([(("emb", name, row), weight) for row in range(found)])
                if leftover == "":
                    continue
                word = leftover
            ids = tokenizer(word)["input_ids"][1:-1]
            groups.append([(t, weight) for t in ids])
    batches: list[list[tuple[object, float]]] = [[]]
    for group in groups:
        large = len(group) >= 8
        while group:
            batch = batches[-1]
            if len(group) + len(batch) > 75:
                if large:
                    room = 75 - len(batch)
                    batch.extend(group[:room])
                    group = group[room:]
                batches.append([])
            else:
                batch.extend(group)
                group = []
    return batches


def ours(text: str, library: EmbeddingLibrary | None = None) -> list[list[tuple[object, float]]]:
    plan = plan_prompt(text, embeddings=library, syntax="comfy")
    out = []
    for chunk in plan.chunks:
        names = {slot.position: ("emb", slot.name, slot.row) for slot in chunk.slots}
        out.append([(names[i] if token == EMBEDDING_SLOT else token, weight)
                    for i, (token, weight) in enumerate(zip(chunk.tokens, chunk.weights))])
    return out


def approx(batches: list[list[tuple[object, float]]]) -> list[list[tuple[object, float]]]:
    return [[(token, round(weight, 9)) for token, weight in batch] for batch in batches]


# --- the weights ------------------------------------------------------------------------------------------

WEIGHTS = [
    ("a ((b:1.2)) [c]", [("a ", 1.0), ("b", 1.2), (" [c]", 1.0)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("((x:1.3))", [("x", 1.3)]),  # flat: Noodle's own syntax gives 1.43
    ("((a:1.2):1.5)", [("a", 1.2)]),
    ("(b (a:1.2))", [("b ", 1.1), ("a", 1.2)]),
    ("(a:b:1.5)", [("a:b", 1.5)]),
    ("(:1.2)", [(":1.2", 1.1)]),  # a colon first is no weight
    ("(x: 1.2 )", [("x", 1.2)]),
    ("(x:1_0)", [("x", 10.0)]),  # float() reads it
    ("(a)(b)", [("a", 1.1), ("b", 1.1)]),  # two runs: not merged
    ("a) (b)", [("a) (b)", 1.0)]),  # after a stray ) the count is below 0: the pair is text
    (")((a)", [(")(", 1.0), ("a", 1.1)]),
    ("(a (b)", [("a ", 1.1), ("(b", 1.1)]),  # open to the end, but ends with ): a group
    ("(a (b) c", [("(a (b) c", 1.0)]),  # open to the end: text
    ("\\(x\\) (y)", [("(x) ", 1.0), ("y", 1.1)]),
    ("\\[x\\] BREAK y", [("\\[x\\] BREAK y", 1.0)]),
    ("()", []),
]


@pytest.mark.parametrize(("text", "expected"), WEIGHTS)
def test_weights_are_comfyuis(text: str, expected: list[tuple[str, float]]) -> None:
    got = [(fragment.text, round(fragment.weight, 9)) for fragment in parse_comfy(text)]
    assert got == [(piece, round(weight, 9)) for piece, weight in expected]
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    reference = [(piece.replace("\0\1", ")").replace("\0\2", "("), round(weight, 9))
                 for piece, weight in _token_weights(escaped, 1.0) if piece]
    assert got == reference


@pytest.mark.parametrize("text", ["(x:nan)", "(x:inf)", "(x:1e39)", "(x:101)", "(" * 49 + "x" + ")" * 49,
                                  "(" * 70 + "x" + ")" * 70])
def test_what_comfyui_would_draw_black_is_refused(text: str) -> None:
    with pytest.raises(PromptError):
        parse_comfy(text)


# --- tokens and chunks ------------------------------------------------------------------------------------

def words(n: int) -> str:
    return " ".join(["cat"] * n)


def test_a_long_prompt_breaks_at_75_tokens_inside_a_word() -> None:
    """ComfyUI keeps only runs of up to 7 tokens whole: a plain long prompt is one run, cut at 75 wherever."""
    text = words(74) + " photorealistic,masterpiece"
    assert ours(text) == comfy_tokens(text)
    assert [len(chunk) for chunk in ours(text)][0] == 75
    assert token_report(text).chunk_tokens[0] == 74  # Noodle's own syntax moves the word whole


def test_a_short_weighted_run_moves_whole() -> None:
    text = words(74) + " (red fox:1.2)"  # 2 tokens, under 8: to the next chunk whole
    assert [len(chunk) for chunk in ours(text)] == [74, 2] == [len(b) for b in comfy_tokens(text)]


def test_a_weighted_run_of_8_tokens_or_more_is_split_to_fill() -> None:
    text = words(70) + " (" + words(10) + ":1.1)"
    assert [len(chunk) for chunk in ours(text)] == [75, 5] == [len(b) for b in comfy_tokens(text)]
    text = words(70) + " (" + words(7) + ":1.1)"
    assert [len(chunk) for chunk in ours(text)] == [70, 7] == [len(b) for b in comfy_tokens(text)]


def test_lora_tags_and_break_are_text() -> None:
    plan = plan_prompt("a cat <lora:detail:0.8> BREAK a dog", syntax="comfy")
    assert plan.report.loras == [] and plan.report.chunks == 1
    assert ours("a cat <lora:detail:0.8> BREAK a dog") == comfy_tokens("a cat <lora:detail:0.8> BREAK a dog")


def test_the_bots_token_report_takes_lora_tags_out_in_either_syntax() -> None:
    """/tokens and `noodle tokens` count what the graph's encode gets: the bot turns the tags into LoraLoaders."""
    for syntax in ("noodle", "comfy"):
        report = token_report("a cat <lora:detail:0.8>", syntax=syntax)  # type: ignore[arg-type]
        assert report.tokens == 2 and report.loras == [{"name": "detail", "unet_weight": 0.8, "clip_weight": 0.8}]
    assert token_report("(a) [cat] BREAK", syntax="comfy").tokens == count_tokens("a [cat] BREAK")


CORPUS = [
    "masterpiece, best quality, (detailed face:1.2), ((sharp focus)), [blurry], 8k uhd, dslr, " * 3,
    "(worst quality, low quality:1.4), (bad anatomy), lowres, " * 6,
    "a (((very))) long " + "prompt with (nested (groups:0.8) and) text, " * 9,
    "\\(escaped\\) (real) \\\\(x) embedding:nothere, cat",
    ") stray (close) (open",
]


@pytest.mark.parametrize("text", CORPUS)
def test_published_style_prompts_match_comfyui(text: str) -> None:
    assert approx(ours(text)) == approx(comfy_tokens(text))


def test_embeddings_as_comfyui_finds_them(embedding_folder: Path) -> None:
    library = EmbeddingLibrary(embedding_folder)
    table = {"sd1style": 2, "oldstyle": 3}
    for text in ["a embedding:sd1style cat", "embedding:oldstyle, cat", "x,embedding:sd1style",
                 "(embedding:sd1style:1.2) cat", "a\nembedding:sd1style  tail  words", "embedding:missing cat"]:
        assert approx(ours(text, library)) == approx(comfy_tokens(text, table)), text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"ab (():1.2,\\\n", "cat ", "embedding:", ":0.5", ")(", "photorealistic "]),
                max_size=120).map("".join))
def test_fuzz_matches_comfyui(text: str) -> None:
    try:
        got = ours(text)
    except PromptError:
        return  # a weight ComfyUI would draw black, or nesting past the limit
    assert approx(got) == approx(comfy_tokens(text))


def test_hostile_brackets_parse_in_linear_time() -> None:
    """ComfyUI's scanner walks each character again at every depth and recurses once per level (past ~1,000 levels
    a RecursionError); this one visits each bracket once and refuses nesting past MAX_NESTING."""
    import time

    start = time.perf_counter()
    deep = ("(" * 40 + "x" + ")" * 40) * 6_000  # 486,000 characters, 6,000 groups 40 deep
    assert [(f.text, round(f.weight, 4)) for f in parse_comfy(deep)[:1]] == [("x", round(1.1**40, 4))]
    assert [f.text for f in parse_comfy("(" * 262_144)] == ["(" * 262_144]  # open to the end: text
    assert [f.text for f in parse_comfy(")" * 262_144)] == [")" * 262_144]
    with pytest.raises(PromptError, match="nest 65 deep"):
        parse_comfy("(a" * 20_000 + ":1)" * 20_000)
    assert time.perf_counter() - start < 20  # each is well under a second; quadratic, minutes


def test_a_name_referenced_many_times_is_looked_up_once(embedding_folder: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each lookup stats the folder's files: 18,000 references in a 256 KiB text took 11 s (0.6 s looked up once)."""
    library = EmbeddingLibrary(embedding_folder)
    calls: list[str] = []
    real = EmbeddingLibrary.lookup
    monkeypatch.setattr(EmbeddingLibrary, "lookup", lambda self, written, widths=None: calls.append(written)
                        or real(self, written, widths))
    plan = plan_prompt("x embedding:sd1style " * 500 + "embedding:nope " * 500, embeddings=library, syntax="comfy")
    assert sorted(calls) == ["nope", "sd1style"] and plan.report.embeddings == ["sd1style"]
