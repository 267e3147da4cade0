"""Progress events of a run, named as ComfyUI's websocket messages, for any front end to follow.

The executor calls a listener with these; the queue forwards them to subscribers. `to_dict`
gives ComfyUI's `{"type": ..., "data": {...}}` message shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base of every run event."""

    prompt_id: str

    type: str = field(init=False, default="event")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("type", None)
        return {"type": self.type, "data": data}


@dataclass(frozen=True)
class ExecutionStart(Event):
    type: str = field(init=False, default="execution_start")


@dataclass(frozen=True)
class ExecutionCached(Event):
    nodes: tuple[str, ...] = ()
    type: str = field(init=False, default="execution_cached")


@dataclass(frozen=True)
class Executing(Event):
    node: str = ""
    class_type: str = ""
    type: str = field(init=False, default="executing")


@dataclass(frozen=True)
class Progress(Event):
    node: str = ""
    value: int = 0
    max: int = 0
    type: str = field(init=False, default="progress")


@dataclass(frozen=True)
class Executed(Event):
    node: str = ""
    output: dict[str, Any] = field(default_factory=dict)
    type: str = field(init=False, default="executed")


@dataclass(frozen=True)
class ExecutionSuccess(Event):
    type: str = field(init=False, default="execution_success")


@dataclass(frozen=True)
class ExecutionError(Event):
    node: str = ""
    class_type: str = ""
    exception_type: str = ""
    message: str = ""
    type: str = field(init=False, default="execution_error")


@dataclass(frozen=True)
class ExecutionInterrupted(Event):
    node: str = ""
    type: str = field(init=False, default="execution_interrupted")
