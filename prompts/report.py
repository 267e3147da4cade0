"""`TokenReport`: what one text encode used and what it cut or ignored.

The engine puts `to_dict()` into the run's `meta` (DESIGN: token usage is counted per text
encode, summed per job, stored and shown on the result); `noodle tokens` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenReport"]


@dataclass(frozen=True)
class TokenReport:
    """Token usage of one prompt.

    `tokens` counts every prompt token (embedding vectors included, start/end/padding not);
    `chunk_tokens` are the tokens of each encoded 75-token chunk, `chunks` their number. A
    configured chunk cap drops whole chunks: `truncated` counts the tokens dropped, so
    `sum(chunk_tokens) + truncated == tokens` always holds.
    """

    tokens: int
    chunks: int
    chunk_tokens: list[int]
    embeddings: list[str] = field(default_factory=list)
    loras: list[dict[str, str | float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    truncated: int = 0

    def to_dict(self) -> dict[str, object]:
        """`{"tokens", "chunks", "chunk_tokens", "embeddings", "loras", "warnings"}`, plus
        `"truncated"` only when a cap cut something (JSON-ready, copies of the lists)."""
        out: dict[str, object] = {
            "tokens": self.tokens,
            "chunks": self.chunks,
            "chunk_tokens": list(self.chunk_tokens),
            "embeddings": list(self.embeddings),
            "loras": [dict(lora) for lora in self.loras],
            "warnings": list(self.warnings),
        }
        if self.truncated > 0:
            out["truncated"] = self.truncated
        return out
