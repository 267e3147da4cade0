"""Who may reach a generation: its requester anywhere; other members only in the server it was made in.

Request numbers are sequential (#1, #2, ...) and easy to guess, so a generation someone may not reach is
answered exactly as one that does not exist: a member of one server must not even learn that another
server's #12 exists, let alone cancel, delete, reroll or read it. A result made in DMs (no server) or a
private one (/settings private, /imagine private:) is its requester's alone. Manage Messages (🗑️ someone
else's result, /queue cancel of their request) counts in the moderator's own server only, since Discord
grants it per server: a moderator of server A is nobody in server B.
"""

from __future__ import annotations

from bot.core.errors import GenerationNotFound
from bot.core.front_end import Requester
from bot.core.storage.records import Generation
from bot.core.storage.store import Store

__all__ = ["may_moderate", "not_found", "reachable", "visible_to"]

SQLITE_ID_MAX = 2**63 - 1  # row ids are SQLite integers: a larger number would overflow the query, not miss


async def reachable(store: Store, generation_id: int, who: Requester) -> Generation | None:
    """Generation #`generation_id` if it exists and `who` may see it; None for both other cases alike."""
    generation = await store.get(generation_id) if 0 < generation_id <= SQLITE_ID_MAX else None
    return generation if generation is not None and visible_to(generation, who) else None


def visible_to(generation: Generation, who: Requester) -> bool:
    """`who` may see `generation` at all: they asked for it, or it is a public result of their server."""
    if generation.requester_id == who.user_id:
        return True
    return generation.guild_id is not None and generation.guild_id == who.guild_id and not generation.private


def may_moderate(generation: Generation, who: Requester) -> bool:
    """`who` may delete or cancel `generation`: its requester, or a Manage Messages member of its server."""
    return generation.requester_id == who.user_id or (who.can_manage_messages and visible_to(generation, who))


def not_found(generation_id: int, noun: str, hint: str) -> GenerationNotFound:
    """The one answer for a number that does not exist and for one `who` may not reach: the same words."""
    return GenerationNotFound(f"there is no {noun} #{generation_id}; {hint}")
