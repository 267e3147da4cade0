"""The engine's errors: each says what was wrong, what is allowed, and what to do next.

Front ends catch `NoodleError` at their edge (a job, a command handler) and show `str(err)`;
`WorkflowInvalid` also carries ComfyUI's validation body for API callers.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class NoodleError(Exception):
    """Base of every error a user can act on."""


class WorkflowInvalid(NoodleError):
    """A workflow failed validation; `body` is ComfyUI's `{"error", "node_errors"}` JSON."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        error = body.get("error", {})
        lines = [f"{error.get('message', 'invalid workflow')}: {error.get('details', '')}".rstrip(": ")]
        for node_id, info in body.get("node_errors", {}).items():
            for item in info.get("errors", []):
                lines.append(f"node {node_id} ({info.get('class_type')}): {item['message']}: {item['details']}")
        super().__init__("\n".join(lines))


class ModelNotFound(NoodleError):
    """A model name that is not in its folder; the message lists the closest names."""

    def __init__(self, kind: str, name: str, folder: str, available: Iterable[str]) -> None:
        self.kind, self.name = kind, name
        names = sorted(available)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.3)
        hint = f"closest: {', '.join(repr(c) for c in close)}" if close else (
            f"available: {', '.join(repr(n) for n in names[:10])}" if names else f"{folder} is empty"
        )
        super().__init__(f"{kind} {name!r} is not in {folder}; {hint}")


class UnsafeModelFile(NoodleError):
    """A pickle file, or a name that leaves its folder."""


class UnsupportedModel(NoodleError):
    """A safetensors file whose architecture or contents Noodle cannot load."""


class LimitExceeded(NoodleError):
    """A value above a limit set in config.toml."""


class QueueFull(LimitExceeded):
    """A job refused by the queue's per-user or global cap (`[queue]` in config.toml)."""


class JobCancelled(NoodleError):
    """A run stopped by an interrupt at a sampler step."""


class JobFailed(NoodleError):
    """A queued job that ended in an error; the message is for the person who asked."""

    def __init__(self, message: str, job_id: str = "") -> None:
        self.job_id = job_id
        super().__init__(message)


class NodeExecutionError(NoodleError):
    """An exception inside a node while a workflow ran, with the node that raised it."""

    def __init__(self, node_id: str, class_type: str, cause: BaseException) -> None:
        self.node_id, self.class_type, self.cause = node_id, class_type, cause
        super().__init__(f"node {node_id} ({class_type}) failed: {cause}")


class DeviceUnavailable(NoodleError, RuntimeError):
    """[engine] device names a device torch cannot see (cuda without a CUDA build): says what to do."""


class EngineBusy(NoodleError):
    """Another engine runs on the same database file (engine/queue/engine_lock.py): says what to do."""


class ClusterUnavailable(NoodleError):
    """[engine] workers = "ray" and Ray is not installed or its cluster cannot be reached: says what to do."""
