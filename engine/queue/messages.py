"""What the owner of a job the queue stopped or could not run is told (the job table's messages)."""

from __future__ import annotations

from engine.queue.jobs import Owner
from engine.settings import QueueSettings

__all__ = ["crashed_message", "lost_message", "nth", "seconds_text", "who_text"]


def seconds_text(value: float) -> str:
    # "612", "3.4", "0.052": a tenth of a second is noise on a ten-minute limit, not on a test's 0.05 s
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def who_text(by: Owner | None) -> str:
    return "" if by is None else f" by {by.user_id}"


def lost_message(attempts: int, where: str, settings: QueueSettings) -> str:
    if not settings.retry_running_once:
        return (f"{where} died while running this job (a crash, a kill or a lost machine); "
                "queue.retry_running_once is off in config.toml, so it was not run again: submit it again")
    return (f"{where} died while running this job, the {nth(attempts)} time it ran (a crash, a kill or a lost "
            "machine, perhaps out of memory); it is not tried again: submit it again, perhaps with a smaller size "
            "or fewer steps")


def nth(count: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(count, f"{count}th")


def crashed_message(attempts: int, settings: QueueSettings) -> str:
    if not settings.retry_running_once:
        return ("Noodle stopped while this job was running (a crash or a kill); queue.retry_running_once is off "
                "in config.toml, so it was not run again: submit it again")
    return (f"Noodle stopped while this job was running, {attempts} times in a row (a crash or a kill, perhaps "
            "out of memory); it is not tried again: submit it again, perhaps with a smaller size or fewer steps")
