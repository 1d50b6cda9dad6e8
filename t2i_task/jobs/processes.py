"""Stored processes, run to their end: the queue between the HTTP routes and the model.

A process is stored DELIVERED, started when the call to the model that carries
it is sent (the scheduler hands it over when the model has room), and ends
FINISHED with its images or ERROR with the reason. This module also keeps that
promise across failures: it admits no more work than it can queue, holds its
work under leases that replicas take over when this one stops or dies
(t2i_task/jobs/leases.py), gives up with a reason on work that keeps being
interrupted, and on shutdown lets running generations finish and releases the rest.

Live calls (OpenAI's, whose client waits on the connection) are processes too
(t2i_task/jobs/live.py).

It knows the store and the task's adapters; the model is a client it is given
(`Model`, service.py's `DiffusionClient`), and HTTP is the caller's business.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from anyio import to_thread
from pydantic import ValidationError

from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import GenerationParameters, lora_list
from t2i_task.config.settings import Settings, UnknownModel
from t2i_task.config.sizes import resized
from t2i_task.generation.runner import GenerationRequest
from t2i_task.jobs.failures import (
    DiskLow,
    GenerationFailed,
    ModelUnavailable,
    ProcessEnded,
    QueueFull,
    ShuttingDown,
    describe_failure,
)
from t2i_task.jobs.batches import BulkLines
from t2i_task.jobs.leases import Leases
from t2i_task.jobs.live import Finished, LiveCalls, stored_parameters
from t2i_task.jobs.loading import ModelLoads
from t2i_task.jobs.model_service import Model
from t2i_task.jobs.progress import ProgressWatch
from t2i_task.jobs.scheduler import ModelScheduler
from t2i_task.storage.store import LeaseLost, Store
from t2i_task.storage.tables import GenerativeProcess, KeyUsage, Priority, RunStatus, utcnow
from t2i_task.task import TextToImageGenerationTask

log = logging.getLogger(__name__)

RETENTION_SWEEP_S = 60  # how often old work is looked for (more often for a retention of under 4 minutes)

CANCELLED = "cancelled"  # the reason an ERROR process was cancelled: "Error details: cancelled"


class ProcessQueue(LiveCalls, Leases, BulkLines):
    def __init__(
        self,
        store: Store,
        task: TextToImageGenerationTask,
        settings: Settings,
        model: Model,
        report_stored: Callable[[dict[Priority, int], list[KeyUsage]], None] | None = None,
    ) -> None:
        self.store, self.task, self.model = store, task, model
        # How far the processes at the model are (t2i_task/jobs/progress.py).
        self.progress = ProgressWatch(store, model.progress, running=lambda: self.at_model)
        self.loads = ModelLoads(model.load, settings.default_model.name)  # work waits here for its model to load
        self.settings, self.serving = settings, settings.serving
        for model in settings.served_models:
            if model.cost is None:
                log.warning("%s: no cost is set (run `make calibrate`): only the field limits bound a request, "
                            "and work the model cannot finish in time ends by timeout", model.name)
        self.instance = settings.serving.instance_name
        # Processes queued or running here, by id; the tasks are held so they
        # are not garbage-collected, and the sweep knows what is in hand.
        self.pending: dict[int, asyncio.Task] = {}
        self.bulk_lines: dict[int, str] = {}  # the pending processes that are bulk lines: their batch ids
        self.answering = 0  # synchronous generations (OpenAI calls) admitted and not yet answered
        self.in_hand: set[int] = set()  # their process ids, once stored
        self.at_model: set[int] = set()  # processes whose call the model service holds
        self.unsent: set[int] = set()  # handed to the model client, their call not sent yet: not started
        self.cancelling: set[int] = set()  # processes being cancelled: they end ERROR "cancelled"
        self.lost: set[int] = set()  # processes ended or taken over elsewhere: nothing of them is stored here
        self.saving: set[int] = set()  # processes whose images are being written and finished
        self.report_stored = report_stored  # told at each sweep: the stored work waiting by priority, usage by key
        # Held while new processes are stored and registered, and while the
        # sweep decides what is lost: the sweep never takes a process that is
        # being stored or generated here.
        self._claims = asyncio.Lock()
        self.draining = False
        # Work waits here (DELIVERED) until the model has room for it, so time in this
        # queue never counts toward a model call's timeout (t2i_task/jobs/scheduler.py).
        self.scheduler = ModelScheduler(settings.model_call_budget_s, max_at_model=2 * settings.batching.max_batch_size,
                                        bulk_hold_s=settings.bulk.hold_after_live_ms / 1000,
                                        bulk_alone_s=settings.bulk.alone_after_live_s)
        self._sweeper: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None
        self._more_work = asyncio.Event()  # set when the model has room and unclaimed work may wait
        self._more_waiting = False  # the last claim took all it had room for: more may wait
        self._progress_watcher: asyncio.Task | None = None
        self._retention: asyncio.Task | None = None
        self._stopping: set[asyncio.Task] = set()  # stops of abandoned live calls, held until done
        self._finalizing: set[asyncio.Task] = set()  # batches whose results are being written here

    async def db(self, call: Callable, *args, **kwargs):
        """Run a blocking store call off the event loop."""
        return await to_thread.run_sync(lambda: call(*args, **kwargs))

    # Admission

    def admit(self, counted: bool = True) -> None:
        """Refuse a new generation early, before it piles into the batcher (`counted`: one that would be
        held here; a batch's lines wait in the database)."""
        if self.draining:
            raise ShuttingDown("Server is shutting down; retry on another instance or later.")
        admitted = len(self.pending) - len(self.bulk_lines) + self.answering
        if counted and admitted >= self.serving.max_queued_generations:
            raise QueueFull(f"Server busy: {admitted} generations are queued. Retry later.")
        low = self.store.low_disks(self.settings.storage.min_free_mb * 2**20)
        if low:
            raise DiskLow(f"Not enough disk space for new images: {', '.join(low)}, below storage.min_free_mb "
                          f"({self.settings.storage.min_free_mb:g} MB). Reading what is stored still works.")

    async def submit(self, session_id: int, inputs: list[tuple[str, str]], model: ServedModel,
                     params: GenerationParameters, partial_images: int = 0) -> GenerativeProcess:
        """Store a new process, with what it runs with, and run it in the background; the caller answers at once."""
        self.admit()
        async with self._claims:
            process = await self.db(self.store.create_process, session_id, inputs, owner=self.instance,
                                    lease_s=self.serving.lease_s,
                                    parameters=stored_parameters(model, params, partial_images))
            self.accept(process, model, params)
        return process

    # Running processes

    def accept(self, process: GenerativeProcess, model: ServedModel | None = None,
               params: GenerationParameters | None = None) -> None:
        """Run a stored process in the background; the caller answers at once."""
        job = asyncio.create_task(self._run_queued(process, model, params))
        self.pending[process.id] = job
        if process.batch_id is not None:
            self.bulk_lines[process.id] = process.batch_id
        self.keep_leases()
        job.add_done_callback(lambda done: self._forget(process.id, done))

    async def _run_queued(self, process: GenerativeProcess, model: ServedModel | None,
                          params: GenerationParameters | None) -> None:
        if model is None or params is None:  # resumed after a restart: as it was stored
            try:
                model, params = await self._stored_run(process)
            except (UnknownModel, ValidationError) as exc:
                await self.db(self.store.fail_process, process.id, f"cannot run as stored: {exc}", self.instance)
                return
        priority = Priority.QUEUED if process.priority is None else Priority(process.priority)
        await self.generate(process, model, params, requeue_if_stopped=True, priority=priority,
                            partial_images=(process.parameters or {}).get("partial_images", 0))

    async def _stored_run(self, process: GenerativeProcess) -> tuple[ServedModel, GenerationParameters]:
        """The model and parameters a process was stored with; a process stored before processes kept
        theirs runs with its session's."""
        stored = process.parameters
        if stored is None:
            session = await self.db(self.store.get_session, process.session_id)
            stored = {**(session.parameters or {}), "model": session.model_name}
        model = self.settings.served_model(stored.get("model"))
        known = {key: value for key, value in stored.items() if key in GenerationParameters.model_fields}
        return model, GenerationParameters.model_validate(known)

    def _forget(self, process_id: int, job: asyncio.Task) -> None:
        self.pending.pop(process_id, None)
        batch_id = self.bulk_lines.pop(process_id, None)
        if batch_id is not None:
            self.line_ended(batch_id)
        self.room_made()
        if not job.cancelled():
            job.exception()  # consumed: the failure is already recorded as the process's ERROR

    async def generate(
        self,
        process: GenerativeProcess,
        model: ServedModel,
        params: GenerationParameters,
        requeue_if_stopped: bool = False,
        priority: Priority = Priority.QUEUED,
        partial_images: int = 0,
    ) -> Finished:
        """Run one stored process to its end: FINISHED with its images, or ERROR with the reason.

        Returns its output rows (file names) on success, raises on failure. If
        the server is stopping (the task cancelled, draining, or the model
        service gone) and `requeue_if_stopped`, the process is released to the
        queue instead (any replica takes it): stopping is not its failure. A process
        ended or taken over elsewhere meanwhile (`lost`, LeaseLost) gets nothing
        stored here: GenerationFailed.
        """
        saved: list[tuple[str, str]] = []
        try:
            prompt = self.task.prepare_for_task(process.input)
            asked = (params.width, params.height)
            width, height = model.drawn(*asked)
            cost_s = model.seconds(params)  # what the scheduler holds for it, and its owner's usage
            request = GenerationRequest(
                prompt=prompt,
                model=model.name,
                negative_prompt=params.negative_prompt or None,  # a form's empty field: none
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                width=width,
                height=height,
                seed=params.seed,
                num_images=params.num_images_per_prompt,
                job=process.id,
                partial_images=partial_images,
                loras=lora_list(params.loras),
            )
            await self.loads.ready(model.name, wait_s=None)  # a live call waited in start_live already
            async with self.scheduler.slot(cost_s, priority, process.account):
                if process.status is not RunStatus.STARTED:  # a live call may be stored started
                    self.unsent.add(process.id)  # started when its call is sent (calls_sent)
                self.at_model.add(process.id)
                try:
                    generated = await self.model.generate(request, priority, process.account)
                finally:
                    self.unsent.discard(process.id)
                    self.at_model.discard(process.id)
                    self.progress.forget(process.id)
            if generated.error:
                raise GenerationFailed(generated.error)
            provenance = [
                {
                    "prompt": prompt,
                    "negative_prompt": params.negative_prompt,
                    "seed": seed,
                    "num_inference_steps": params.num_inference_steps,
                    "guidance_scale": params.guidance_scale,
                    "size": f"{params.width}x{params.height}",
                    "drawn_size": f"{width}x{height}",  # resized to `size` when they differ
                    "model": model.name,
                    "loras": params.loras,
                }
                for seed in generated.seeds
            ]

            def save_and_finish() -> None:  # one trip to a worker thread: this is on the answer's path
                images = [resized(image, *asked) for image in generated.images]
                saved.extend(self.store.images.save(lambda folder: self.task.process_output(
                    images, images_path=folder, parameters=provenance)))
                self.store.finish_process(process.id, saved, holder=self.instance, model_seconds=cost_s)  # or LeaseLost

            self.saving.add(process.id)  # a lost lease no longer stops it: finish_process decides
            try:
                await to_thread.run_sync(save_and_finish)
            finally:
                self.saving.discard(process.id)
            return Finished(saved, [resized(image, *asked) for image in generated.previews], generated.prompt_tokens)
        except BaseException as exc:
            self.store.remove_images(name for name, _ in saved)
            if isinstance(exc, LeaseLost) or process.id in self.lost:
                self.lost.discard(process.id)
                log.warning("process %s ended or was taken over elsewhere; nothing of it is stored here", process.id)
                raise GenerationFailed(f"Process {process.id} was ended or taken over by another replica "
                                       "while it ran here.") from exc
            try:
                stopping = isinstance(exc, (asyncio.CancelledError, ModelUnavailable)) or self.draining
                if process.id in self.cancelling:
                    await self.db(self.store.fail_process, process.id, CANCELLED)
                elif stopping and requeue_if_stopped:
                    await self.db(self.store.release, self.instance, [process.id])
                else:
                    await self.db(self.store.fail_process, process.id, describe_failure(exc), self.instance)
            except Exception:  # already ended, taken over, or the database gone: the lease decides
                log.exception("could not record the outcome of process %s", process.id)
            raise

    async def calls_sent(self, requests: list[GenerationRequest]) -> None:
        """A call to the model has just been sent with these requests: their processes are stamped
        started (status 2, start time) in one write, beside the call; one cancelled before its call
        was sent never gets a start time."""
        sent = [request.job for request in requests if request.job in self.unsent]
        self.unsent.difference_update(sent)
        if sent:
            try:
                await self.db(self.store.start_processes, sent, self.instance)
            except Exception as exc:  # the database away: they run all the same, and end as they end
                log.warning("could not mark processes %s started: %s", sent, type(exc).__name__)

    async def cancel(self, process_id: int) -> GenerativeProcess:
        """End a process as ERROR "cancelled": a queued one never starts, a running one's images
        are never written, and the model stops its call at the next step if nothing else in
        that call is wanted. Raises ProcessEnded for a process that has already ended."""
        process = await self.db(self.store.get_process, process_id)
        if process.status in (RunStatus.FINISHED, RunStatus.ERROR):
            raise ProcessEnded(f"Process {process_id} has already ended ({process.status.name}); nothing to cancel.")
        if process_id in self.in_hand:
            raise ProcessEnded(f"Process {process_id} answers a live request (OpenAI API), whose client holds it; "
                               "it cannot be cancelled here.")
        job = self.pending.get(process_id)
        if job is None:  # held by another replica, which finds it ended when it next renews its lease
            await self.db(self.store.fail_process, process_id, CANCELLED)
            return await self.db(self.store.get_process, process_id)
        await self._stop(process_id, job)
        process = await self.db(self.store.get_process, process_id)
        if process.status is RunStatus.FINISHED:  # it ended just before the cancel reached it
            raise ProcessEnded(f"Process {process_id} has already ended (FINISHED); nothing to cancel.")
        return process

    # Start, sweep, stop

    async def start(self) -> None:
        """Take back this instance's interrupted work and what waits unheld, drop orphan files, then
        keep sweeping for work to take (t2i_task/jobs/leases.py)."""
        await self.take_unheld_work()
        removed = await self.db(self.store.remove_orphan_images, self.serving.request_timeout_s)
        if removed:
            log.warning("removed %d image files that no process names", len(removed))
        self.keep_leases()
        self._sweeper = asyncio.create_task(self._sweep())
        self._progress_watcher = asyncio.create_task(self.progress.watch(lambda: self.draining))
        if self.settings.storage.retention:
            self._retention = asyncio.create_task(self._forget_old_work(self.settings.storage.retention))

    async def _forget_old_work(self, retention_s: float) -> None:
        """`storage.retention`: now and then, delete processes that ended longer ago than that, with their
        images (one replica at a time: Store.remove_ended_before)."""
        while not self.draining:
            await asyncio.sleep(min(RETENTION_SWEEP_S, max(1.0, retention_s / 4)))
            try:
                cutoff = utcnow() - timedelta(seconds=retention_s)
                removed = await self.db(self.store.remove_ended_before, cutoff)
                batches = await self.db(self.store.remove_batches_ended_before, cutoff)
                if removed or batches:
                    log.info("retention: removed %d processes and %d batches that ended over %gs ago", removed,
                             batches, retention_s)
            except Exception as exc:  # the database away: next time
                log.warning("retention sweep skipped: %s", type(exc).__name__)

    async def _stop(self, process_id: int, job: asyncio.Future) -> None:
        """Cancel a process's generation here: at the model if it is there, then its task,
        whose generate() records the process as ERROR "cancelled"."""
        self.cancelling.add(process_id)
        try:
            if process_id in self.at_model:
                await self.model.cancel([process_id])
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        finally:
            self.cancelling.discard(process_id)

    async def drain(self) -> None:
        """Refuse new work, release what has not reached the model at once (any replica takes it),
        let running generations finish, release the rest."""
        self.draining = True
        for watcher in (self._sweeper, self._progress_watcher, self._retention):
            if watcher:
                watcher.cancel()
        waiting = [job for process_id, job in self.pending.items() if process_id not in self.at_model]
        for job in waiting:
            job.cancel()  # generate() releases its process
        jobs = [job for job in self.pending.values() if job not in waiting]
        log.warning("draining: %d queued processes released, %d at the model may run for %.0fs; new work is "
                    "refused", len(waiting), len(jobs), self.serving.drain_timeout_s)
        await asyncio.gather(*waiting, return_exceptions=True)
        if jobs:
            _, unfinished = await asyncio.wait(jobs, timeout=self.serving.drain_timeout_s)
            for job in unfinished:
                job.cancel()  # generate() releases its process
            await asyncio.gather(*unfinished, return_exceptions=True)
            log.warning("drained: %d finished, %d released", len(jobs) - len(unfinished), len(unfinished))
        if self._finalizing:  # a batch's results being written: let them be (else its lease expires first)
            await asyncio.wait(self._finalizing, timeout=self.serving.drain_timeout_s)
        if self._renewer:  # leases were renewed while the running work finished
            self._renewer.cancel()
