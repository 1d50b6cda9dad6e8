"""How far running generations are: asked of the model, kept here, written for the other replicas.

The model's worker records each job's denoising steps in its step callback
(t2i_task/generation/runner.py); `ProgressWatch.watch` asks it every `POLL_S` while processes of
this replica are at the model, keeps the answer for this replica's routes, and
writes it to the database every `WRITE_S`, so any replica answers with progress
at most about a second old. The same answer says how many partial images each
job has: a live call streaming them fetches the new ones (live.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection

from anyio import to_thread

from t2i_task.storage.store import Store
from t2i_task.storage.tables import GenerativeProcess, RunStatus

log = logging.getLogger(__name__)

ModelProgress = Callable[[], Awaitable[dict[int, tuple[int, int, int]]]]  # job: (step, total, previews)
POLL_S = 0.5  # how often the model is asked how far its running call is
WRITE_S = 1.0  # how often that is written to the database


class ProgressWatch:
    def __init__(self, store: Store, model_progress: ModelProgress | None,
                 running: Callable[[], Collection[int]]) -> None:
        self.store, self.model_progress, self.running = store, model_progress, running
        self.fresh: dict[int, tuple[int, int]] = {}  # (steps done, steps in all) by process id
        self.previews_ready: dict[int, int] = {}  # partial images the model holds, by process id

    def of(self, process: GenerativeProcess) -> tuple[int, int] | None:
        """(steps done, steps in all): fresh for a process running here, else as last recorded."""
        steps = self.fresh.get(process.id) if process.status is RunStatus.STARTED else None
        if steps is None and process.progress_total:
            steps = (process.progress_step or 0, process.progress_total)
        return steps

    def forget(self, process_id: int) -> None:
        self.fresh.pop(process_id, None)

    async def watch(self, stopping: Callable[[], bool]) -> None:
        written = 0.0
        while not stopping():
            await asyncio.sleep(POLL_S)
            running = self.running()
            if not running or self.model_progress is None:
                self.fresh, self.previews_ready = {}, {}
                continue
            try:
                reported = await self.model_progress()
            except Exception as exc:  # the model busy starting or stopping: next time
                log.debug("progress unavailable: %s", type(exc).__name__)
                continue
            running = self.running()
            self.fresh = {job: (step, total) for job, (step, total, _) in reported.items() if job in running}
            self.previews_ready = {job: previews for job, (_, _, previews) in reported.items() if job in running}
            if self.fresh and time.monotonic() - written >= WRITE_S:
                try:
                    await to_thread.run_sync(self.store.record_progress, dict(self.fresh))
                    written = time.monotonic()
                except Exception as exc:  # the database away: the routes here still know
                    log.warning("progress not recorded: %s", type(exc).__name__)
