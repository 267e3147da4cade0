"""/tokens: a prompt's token report (CLIP's 75-token chunks, embeddings, LoRA tags, warnings) as text.

The same count a result card's Tokens field shows, before spending a job on it; transport-free. A prompt with
`{a|b}` choices or `__wildcards__` is counted as one draw of them (seed 0), as the result card counts the draw
its seed made: the syntax itself is never encoded.
"""

from __future__ import annotations

from pathlib import Path

from bot.core.cards.card import truncate
from bot.core.errors import RequestInvalid
from prompts.chunks import CHUNK_TOKENS
from prompts.embeddings import EmbeddingLibrary
from prompts.errors import PromptError
from prompts.plan import Syntax, token_report
from prompts.wildcards import resolve_wildcards

__all__ = ["token_text"]


def token_text(text: str, embeddings_dir: Path, max_chunks: int | None = None, syntax: Syntax = "noodle") -> str:
    """`42/75 tokens (1 chunk)` plus the embeddings, LoRA tags and warnings found; RequestInvalid when the
    prompt cannot be read (an unclosed bracket, an unknown embedding...)."""
    if not text.strip():
        raise RequestInvalid("there is no text to count; give the prompt, e.g. /tokens a red fox, (snow:1.2)")
    try:
        drawn = resolve_wildcards(text, 0)
        report = token_report(drawn, EmbeddingLibrary(embeddings_dir),
                              max_chunks=max_chunks, syntax=syntax)
    except PromptError as err:
        raise RequestInvalid(f"the prompt cannot be read: {err}") from None
    chunks = max(1, report.chunks)
    lines = [f"{report.tokens}/{CHUNK_TOKENS * chunks} tokens ({chunks} chunk{'s' if chunks > 1 else ''}: "
             f"{', '.join(str(n) for n in report.chunk_tokens) or '0'})"]
    if report.truncated:
        lines.append(f"{report.truncated} tokens past the limit of {max_chunks} chunks are cut "
                     "(limits.max_prompt_chunks in config.toml); shorten the prompt")
    if report.embeddings:
        lines.append(f"embeddings: {', '.join(report.embeddings)}")
    if report.loras:
        lines.append("LoRA tags: " + ", ".join(str(lora.get("name")) for lora in report.loras))
    lines += [f"warning: {warning}" for warning in report.warnings]
    if drawn != text:
        lines.append(f"counted for one draw of its choices and wildcards: {truncate(drawn, 300)}")
    return "\n".join(lines)
