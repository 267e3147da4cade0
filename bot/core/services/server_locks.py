"""One lock per server for the changes that read a server's row, check it and write it back.

/rules and /preset read, change and store with awaits in between; two moderators at once (one bans a word while
another sets the threshold) each wrote over the other's change, and two /preset creates of one name both passed
the "already taken" check, the second failing in SQLite. The bot runs one event loop, so an asyncio.Lock per
server orders them; reads never wait.
"""

from __future__ import annotations

import asyncio

__all__ = ["ServerLocks"]


class ServerLocks:
    """`async with locks(server):` around one server's read-check-write."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, server: str) -> asyncio.Lock:
        return self._locks.setdefault(server, asyncio.Lock())
