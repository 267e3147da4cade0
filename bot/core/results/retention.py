"""Retention: uploads, the engine's finished job rows and (when asked) results older than `[retention]` go.

The result collector (bot/core/results/collector.py) starts one `Retention` task: it prunes at start and
then every `check_every_hours`, and is cancelled on stop. It only ever looks inside [engine]
input_dir/[bot] uploads_folder and [engine] output_dir/[bot] results_folder (never the folders
themselves, never through a link), and keeps every file a request still queued or running loads.
Results are retired as the 🗑️ reaction retires them: the PNGs go, the row stays as history in state
`deleted`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from bot.core.results.files import remove_files, written_files
from bot.core.storage.records import Generation
from bot.core.storage.store import Store
from bot.settings import BotSettings, RetentionSettings
from engine.errors import NoodleError
from engine.queue import JobRecord, JobStore

__all__ = ["Pruned", "Retention", "expired_files", "inputs_of", "owned_folder"]

log = logging.getLogger(__name__)
DAY = 86400.0


@dataclass(frozen=True)
class Pruned:
    """What one pass removed."""

    uploads: int = 0
    job_rows: int = 0
    results: int = 0  # requests retired (their PNGs removed, their rows kept as `deleted`)
    result_files: int = 0  # PNGs under the results folder removed (theirs and strays)

    def __bool__(self) -> bool:
        return any((self.uploads, self.job_rows, self.results, self.result_files))


def inputs_of(generation: Generation) -> set[str]:
    """The input-folder files a generation loads: its img2img source and every LoadImage of its workflows."""
    names = {str(generation.params["init_image"])} if generation.params.get("init_image") else set()
    for job in generation.jobs:
        names |= _loaded(job.workflow)
    return names


def _loaded(workflow: dict[str, Any]) -> set[str]:
    """The `image` of every LoadImage node of an API workflow."""
    return {node["inputs"]["image"] for node in workflow.values()
            if isinstance(node, dict) and node.get("class_type") == "LoadImage"
            and isinstance(node.get("inputs", {}).get("image"), str)}


def owned_folder(root: Path, name: str, key: str) -> Path | None:
    """`root/name` when it lies strictly inside `root`; None (and a warning) for "", "." or a path leaving it."""
    root = root.resolve()
    folder = (root / name).resolve()
    if root not in folder.parents:
        log.warning("retention leaves %s alone: [bot] %s = %r is not a folder inside it", root, key, name)
        return None
    return folder


def expired_files(folder: Path, before: float, keep: set[Path]) -> list[Path]:
    """Regular files under `folder` last modified before `before` and not in `keep`; links are never followed."""
    found: list[Path] = []
    for top, _, files in os.walk(folder, followlinks=False):
        for name in files:
            path = Path(top) / name
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_mtime < before and path not in keep:
                found.append(path)
    return found


def still_expired(paths: list[Path], before: float) -> list[Path]:
    """Those of `paths` not modified since `before` now: a request queued after they were listed touched the ones
    it loads again (a 🔁 of an old img2img), and those stay."""
    kept = []
    for path in paths:
        try:
            if path.lstat().st_mtime < before:
                kept.append(path)
        except FileNotFoundError:
            continue
    return kept


def _remove_empty_folders(folder: Path) -> None:
    """Date folders a pass emptied (results/<date>/); `folder` itself stays."""
    for top, dirs, files in os.walk(folder, topdown=False, followlinks=False):
        if Path(top) != folder and not dirs and not files:
            try:
                Path(top).rmdir()
            except OSError:  # something was written meanwhile: keep it
                pass


class Retention:
    """Prunes by the `[retention]` table, once (`prune`) or at start and on a timer (`start`/`stop`)."""

    def __init__(self, store: Store, bot: BotSettings, settings: RetentionSettings, *, input_dir: Path,
                 output_dir: Path) -> None:
        self.store, self.bot, self.settings = store, bot, settings
        self.input_dir, self.output_dir = input_dir, output_dir
        self._task: asyncio.Task[None] | None = None
        self.passed = asyncio.Event()  # set after each pass of the task, for whoever wants to know it ran

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (all 0: nothing is ever pruned and no task runs)."""
        s = self.settings
        return any(days > 0 for days in (s.uploads_days, s.job_rows_days, s.results_days))

    def start(self) -> None:
        """Prune now and then every `check_every_hours`, in a task `stop` cancels."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        """Cancel the task (a pass cut short is simply redone at the next start)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)

    async def _run(self) -> None:
        while True:
            try:
                pruned = await self.prune()
                if pruned:
                    log.info("retention removed %s", pruned)
            except (OSError, aiosqlite.Error, sqlite3.Error, NoodleError):  # the next pass tries again
                log.exception("retention could not prune this time")
            self.passed.set()
            await asyncio.sleep(self.settings.check_every_hours * 3600)

    async def prune(self, now: float | None = None) -> Pruned:
        """One pass: uploads, the engine's finished rows, then results, each by its own limit."""
        now = time.time() if now is None else now
        s = self.settings
        uploads = await self._uploads(now - s.uploads_days * DAY) if s.uploads_days > 0 else 0
        rows = await asyncio.to_thread(self._job_rows, now - s.job_rows_days * DAY) if s.job_rows_days > 0 else 0
        results, files = await self._results(now - s.results_days * DAY) if s.results_days > 0 else (0, 0)
        return Pruned(uploads, rows, results, files)

    async def _uploads(self, before: float) -> int:
        folder = owned_folder(self.input_dir, self.bot.uploads_folder, "uploads_folder")
        if folder is None or not folder.is_dir():
            return 0
        # read before the folder: a request queued after this read was saved (or touched) after `before`
        in_use = {name for generation in await self.store.pending() for name in inputs_of(generation)}
        in_use |= {name for job in await asyncio.to_thread(self._active_jobs) for name in _loaded(job.workflow)}
        keep = {(self.input_dir / name).resolve() for name in in_use}
        expired = await asyncio.to_thread(expired_files, folder, before, keep)
        expired = await asyncio.to_thread(still_expired, expired, before)  # checked again at the last moment
        return await asyncio.to_thread(remove_files, [str(path) for path in expired])

    def _active_jobs(self) -> list[JobRecord]:
        """Queued and running jobs of the engine's table (a job of `noodle run` has no bot row)."""
        jobs = JobStore(self.bot.database)
        try:
            return jobs.active()
        finally:
            jobs.close()

    def _job_rows(self, before: float) -> int:
        jobs = JobStore(self.bot.database)
        try:
            return jobs.prune_finished(before)
        finally:
            jobs.close()

    async def _results(self, before: float) -> tuple[int, int]:
        folder = owned_folder(self.output_dir, self.bot.results_folder, "results_folder")
        if folder is None:
            return 0, 0
        retired = 0
        files = 0
        for generation in await self.store.finished_before(before):
            mine = [path for path in generation.images if folder in Path(path).resolve().parents]
            files += await asyncio.to_thread(remove_files, mine)
            await self.store.mark_deleted(generation.id, time.time())
            retired += 1
        if folder.is_dir():  # strays: PNGs no row names any more (a crash between writing and recording)
            keep = {Path(path).resolve() for path in await self.store.images_kept(before)}
            # a pending request's images that ended already are named by their job's result alone until it settles
            # (its other images still run, or a restart retries one): never strays
            keep |= {Path(path).resolve() for generation in await self.store.pending()
                     for path in written_files(self.output_dir, [job.result for job in generation.jobs])}
            expired = await asyncio.to_thread(expired_files, folder, before, keep)
            files += await asyncio.to_thread(remove_files, [str(path) for path in expired])
            await asyncio.to_thread(_remove_empty_folders, folder)
        return retired, files
