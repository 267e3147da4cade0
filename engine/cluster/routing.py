"""Which free worker starts which queued job: the one that already holds its models. Pure: no Ray, no clock.

A job needs checkpoints, LoRAs and text encodings (`Needs`, read from its graph); a worker holds some of
them (`Holdings`, which it reports after each batch). When workers are free, `Router.assign` goes through
the queue in its fair order (engine/queue/fairness.py):

1. a job passed over `patience` times goes first: to a free worker holding its models; else, when a busy worker
   holds them, it is that worker's next job (it waits at most the job that worker runs); else to the free worker
   that loads it most cheaply;
2. a job whose checkpoints a free worker holds goes to it (then the one with more of its LoRAs, then more
   of its text encodings, then the one idle longest);
3. the others, in order: a job whose checkpoint a busy worker holds waits for it (it is passed over when a
   later job starts meanwhile), unless it has waited `patience` times; the rest go to the free worker that
   loads them most cheaply: one with room for them (no eviction), then the one idle longest, whose models
   were used least recently;
4. a worker still free then takes the first waiting job after all: a load now beats an idle device.

So a job is passed over (a later job starts while it waits) `patience` times, plus the jobs other workers start
while its checkpoint's busy holder finishes one, on top of the fair order; patience 0 keeps the fair order
exactly and only chooses among free workers. `round_robin` ignores what workers hold (the
bench's baseline). Each pick carries its reason, which the job's meta keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Candidate", "Holdings", "Needs", "Pick", "Router", "needs_of"]

# inputs that name what a graph needs loaded, by the folder their choices come from
_MODEL_INPUTS = {"checkpoints": "checkpoints", "loras": "loras"}
TEXT_INPUTS = {"CLIPTextEncode": ("text",), "CLIPTextEncodeSDXL": ("text_g", "text_l"),
               "CLIPTextEncodeSDXLRefiner": ("text",)}


@dataclass(frozen=True)
class Needs:
    """What a job loads: checkpoint and LoRA file names, and the texts it encodes."""

    checkpoints: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    load_bytes: int = 0  # its checkpoint files' sizes: what loading them takes, about


@dataclass(frozen=True)
class Holdings:
    """What a worker has in memory, as it reported after its last batch."""

    checkpoints: tuple[str, ...] = ()  # least recently used first
    loras: frozenset[str] = frozenset()
    texts: frozenset[tuple[str, str]] = frozenset()  # (checkpoint, text) encoded recently
    free_bytes: int = 0  # its model memory budget less what is loaded

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": list(self.checkpoints), "loras": sorted(self.loras), "texts": len(self.texts),
                "free_bytes": self.free_bytes}


@dataclass(frozen=True)
class Candidate:
    """A worker as routing sees it."""

    name: str
    holdings: Holdings
    free: bool
    idle_since: float = 0.0  # when it last finished (any monotonic clock): lower is idle longer


@dataclass(frozen=True)
class Pick:
    """A queued job given to a free worker, and why that one."""

    worker: str
    job_id: str
    reason: str


@dataclass
class Router:
    """Assigns queued jobs to free workers; remembers how often each job was passed over."""

    policy: Literal["models", "round_robin"] = "models"
    patience: int = 4
    window: int = 32  # queued jobs looked at: the rest can only be overtaken later
    passed_over: dict[str, int] = field(default_factory=dict)
    _turn: int = 0

    def assign(self, queued: Sequence[tuple[str, Needs]], workers: Sequence[Candidate],
               avoid: Mapping[str, Iterable[str]] | None = None) -> list[Pick]:
        """Picks for the free `workers` from `queued` ((job id, needs), in the fair order); `avoid`: job id ->
        workers it should not go back to (one died running it) while another can take it."""
        free = [w for w in workers if w.free]
        if not free or not queued:
            return []
        avoid = avoid or {}
        if self.policy == "round_robin":
            return self._round_robin(queued, workers)
        window = list(queued[: self.window])
        picks: dict[str, Pick] = {}
        busy = [w for w in workers if not w.free]

        def allowed(job_id: str) -> list[Candidate]:
            left = [w for w in free if w.name not in {p.worker for p in picks.values()}]
            others = [w for w in left if w.name not in set(avoid.get(job_id, ()))]
            return others or left

        # 0. patience 0: the fair order exactly, each job to the best free worker for it
        if self.patience == 0:
            for job_id, needs in window:
                if not (options := allowed(job_id)):
                    break
                worker, why = _best(needs, options)
                picks[job_id] = Pick(worker.name, job_id, why)
            return list(picks.values())
        # 1. jobs out of patience, in order: to a free worker holding their models, else the first of a busy one
        # that holds them (its current job is the most they wait), else the free worker that loads them cheapest
        held_busy = {job_id for job_id, needs in window
                     if needs.checkpoints and any(_holds(w.holdings, needs) for w in busy)}
        for job_id, needs in window:
            if self.passed_over.get(job_id, 0) < self.patience or not (options := allowed(job_id)):
                continue
            if job_id in held_busy and not any(_holds(w.holdings, needs) for w in options):
                continue
            worker, why = _best(needs, options)
            picks[job_id] = Pick(worker.name, job_id, f"out of patience; {why}")
        # 2. jobs a free worker holds the checkpoints of
        for job_id, needs in window:
            if job_id in picks or not needs.checkpoints or not (options := allowed(job_id)):
                continue
            if any(_holds(w.holdings, needs) for w in options):
                worker, why = _best(needs, options)
                picks[job_id] = Pick(worker.name, job_id, why)
        # 3. the others, in order; a job a busy worker holds waits for it while another job can use a free one
        deferred: list[tuple[str, Needs]] = []
        for job_id, needs in window:
            if job_id in picks or not (options := allowed(job_id)):
                continue
            if needs.checkpoints and any(_holds(w.holdings, needs) for w in busy):
                deferred.append((job_id, needs))
                continue
            worker, why = _cheapest(needs, options)
            picks[job_id] = Pick(worker.name, job_id, why)
        # 4. a worker still free takes a waiting job after all: a load now beats an idle device
        for job_id, needs in deferred:
            if options := allowed(job_id):
                worker, why = _cheapest(needs, options)
                picks[job_id] = Pick(worker.name, job_id, f"its holder is busy; {why}")
        chosen = [_with_waits(pick, self.passed_over.get(job_id, 0)) for job_id, _ in window
                  if (pick := picks.get(job_id)) is not None]
        self._count_passed_over([job_id for job_id, _ in window], set(picks))
        return chosen

    def forget(self, job_ids: Iterable[str]) -> None:
        """Jobs that started or left the queue."""
        for job_id in job_ids:
            self.passed_over.pop(job_id, None)

    def _count_passed_over(self, order: list[str], started: set[str]) -> None:
        if not started:
            return
        last = max(index for index, job_id in enumerate(order) if job_id in started)
        for job_id in order[:last]:
            if job_id not in started:
                self.passed_over[job_id] = self.passed_over.get(job_id, 0) + 1
        self.forget(started)

    def _round_robin(self, queued: Sequence[tuple[str, Needs]], workers: Sequence[Candidate]) -> list[Pick]:
        """The fair order onto the workers in turn, whatever they hold: the baseline routing is measured against."""
        picks: list[Pick] = []
        names = [w.name for w in workers]
        free = {w.name for w in workers if w.free}
        jobs = iter(queued)
        for _ in range(len(names)):
            name = names[self._turn % len(names)]
            if name not in free:
                break  # the next in turn is busy: the job waits for it
            job = next(jobs, None)
            if job is None:
                break
            picks.append(Pick(name, job[0], "round-robin (routing by held models is off)"))
            self._turn += 1
        return picks


def _with_waits(pick: Pick, times: int) -> Pick:
    return pick if not times else Pick(pick.worker, pick.job_id, f"{pick.reason} (passed over {times} times)")


def _best(needs: Needs, options: Sequence[Candidate]) -> tuple[Candidate, str]:
    """The free worker for `needs`: one holding its checkpoints (more of its LoRAs and text encodings first, then
    idle longest), else the one that loads them most cheaply."""
    holders = [w for w in options if needs.checkpoints and _holds(w.holdings, needs)]
    if not holders:
        return _cheapest(needs, options)
    best = max(holders, key=lambda w: _warmth(w.holdings, needs) + (-w.idle_since,))
    return best, _held_reason(best.holdings, needs)


def _holds(holdings: Holdings, needs: Needs) -> bool:
    return all(name in holdings.checkpoints for name in needs.checkpoints)


def _warmth(holdings: Holdings, needs: Needs) -> tuple[int, int]:
    """(LoRAs held, text encodings held) of what `needs` asks for."""
    loras = sum(name in holdings.loras for name in needs.loras)
    texts = sum((ckpt, text) in holdings.texts for ckpt in needs.checkpoints[:1] for text in needs.texts)
    return loras, texts


def _held_reason(holdings: Holdings, needs: Needs) -> str:
    loras, texts = _warmth(holdings, needs)
    parts = [f"holds {_names(needs.checkpoints)}"]
    if needs.loras:
        parts.append(f"{loras} of its {len(needs.loras)} LoRAs")
    if needs.texts:
        parts.append(f"{texts} of its {len(needs.texts)} text encodings")
    return ", ".join(parts)


def _cheapest(needs: Needs, options: Sequence[Candidate]) -> tuple[Candidate, str]:
    """The free worker that loads `needs` most cheaply: room without evicting, then idle longest."""
    roomy = [w for w in options if w.holdings.free_bytes >= needs.load_bytes]
    pool = roomy or list(options)
    best = min(pool, key=lambda w: w.idle_since)
    what = _names(needs.checkpoints) if needs.checkpoints else "its models"
    if not needs.checkpoints:
        return best, "needs no checkpoint; idle longest"
    if roomy:
        return best, f"no free worker holds {what}; it has room for it ({_gib(best.holdings.free_bytes)} free)"
    held = f", evicting {_names(best.holdings.checkpoints[:1])}" if best.holdings.checkpoints else ""
    return best, f"no free worker holds {what}; idle longest{held}"


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "nothing"


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def needs_of(workflow: Mapping[str, Any], catalog: Mapping[str, Any], size: Any = None) -> Needs:
    """What an API-format workflow loads: the values of its inputs that choose from the checkpoints and loras
    folders (by the node catalog's specs), and its CLIP text encoders' texts; `size(name)` gives a checkpoint
    file's bytes."""
    found: dict[str, list[str]] = {"checkpoints": [], "loras": []}
    texts: list[str] = []
    for node in workflow.values():
        if not isinstance(node, Mapping):
            continue
        class_type, inputs = node.get("class_type"), node.get("inputs") or {}
        cls = catalog.get(class_type) if isinstance(class_type, str) else None
        if cls is None or not isinstance(inputs, Mapping):
            continue
        for spec in cls.input_specs():
            value = inputs.get(spec.name)
            if spec.choices_from in _MODEL_INPUTS and isinstance(value, str):
                found[_MODEL_INPUTS[spec.choices_from]].append(value)
        texts += [value for name in TEXT_INPUTS.get(class_type, ()) if isinstance(value := inputs.get(name), str)]
    checkpoints = tuple(dict.fromkeys(found["checkpoints"]))
    load = sum(size(name) for name in checkpoints) if size is not None else 0
    return Needs(checkpoints, tuple(dict.fromkeys(found["loras"])), tuple(dict.fromkeys(texts)), load)
