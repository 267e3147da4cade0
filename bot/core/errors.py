"""The bot's own errors; all are `NoodleError`s, so both front ends show `str(err)` to the person who asked.

Each message says what was wrong, what is allowed, and what to do next.
"""

from __future__ import annotations

from engine.errors import NoodleError


class RequestInvalid(NoodleError):
    """An option, attachment or prompt that cannot become a workflow as given."""


class NotAllowed(NoodleError):
    """Someone asked for something only the requester or a moderator may do."""


class GenerationNotFound(NoodleError):
    """A job id, generation id or message that Noodle has no record of."""
