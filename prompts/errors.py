"""The one exception the `prompts` package raises: `PromptError`.

It derives from `ValueError` because every cause is a value the user typed (a prompt, a style
name, a wildcard name). The engine node that parsed the text wraps it with the node id.
"""

from __future__ import annotations

__all__ = ["PromptError"]


class PromptError(ValueError):
    """A prompt, style or wildcard that cannot be used as written; the message says how to fix it."""
