"""Live calls: generations whose client waits on the connection (OpenAI's), part of the queue.

A live call is a process too, stored and run like any other but at live priority
and refused at once (429) when the work ahead of it would keep it from finishing
in time. `start_live` stores and starts one; its caller watches it, takes its
partial images as the model decodes them and stops it when its client leaves.
`LiveCalls` is the part of `ProcessQueue` (processes.py) that does this, and hands
out the partial images of a stored process that asked for them (its event stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from PIL import Image

from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import GenerationParameters
from t2i_task.config.sizes import resized
from t2i_task.jobs.failures import ClientGone, QueueFull
from t2i_task.jobs.scheduler import Priority
from t2i_task.storage.tables import GenerativeProcess, RunStatus

def stored_parameters(model: ServedModel, params: GenerationParameters, partial_images: int = 0) -> dict:
    """What a process keeps of what it runs with: its model, its resolved parameters, and the partial
    images of each image it was asked to decode while drawn (read back by ProcessQueue._run_queued)."""
    extra = {"partial_images": partial_images} if partial_images else {}
    return {"model": model.name, **params.model_dump(), **extra}


CLIENT_POLL_S = 0.5  # how often a live request looks whether its client is still there


@dataclass
class Finished:
    """A process that ended FINISHED: its output rows and what its call gave besides the images."""

    outputs: list[tuple[str, str]]  # (image file name, kind), as stored
    previews: list[Image.Image] = field(default_factory=list)
    prompt_tokens: int = 0


@dataclass
class LiveCall:
    """A live generation in flight: its process and the task running it (its result: Finished)."""

    process_id: int
    model: ServedModel
    params: GenerationParameters
    running: asyncio.Task


class LiveCalls:
    """ProcessQueue's methods for callers who wait (it provides the state they use)."""

    async def start_live(
        self, session_id: int, inputs: list[tuple[str, str]], model: ServedModel, params: GenerationParameters,
        partial_images: int = 0,
    ) -> LiveCall:
        """Store a new process and start it for a caller who waits (live priority), with
        `partial_images` previews of each image decoded while it is drawn.

        Refused (QueueFull) when the work ahead of it would keep it from finishing in time, and
        (ModelLoading) when its model is still loading after `serving.model_load_wait_s`.
        """
        self.admit()
        await self.loads.ready(model.name, self.serving.model_load_wait_s)  # ModelLoading: 503, the load goes on
        wait_s = self.scheduler.wait_s(model.seconds(params), Priority.LIVE)
        if wait_s > 0:
            ahead = self.scheduler.waiting_s(Priority.LIVE)
            raise QueueFull(f"Server busy: about {ahead:.0f} s of work is ahead of this request, which could not "
                            f"finish in time. Retry later.", retry_after_s=wait_s)
        self.answering += 1
        # One that the model has room for is stored STARTED: one write less on its path (it may
        # still wait a moment for its slot if another took the room meanwhile).
        status = RunStatus.STARTED if self.scheduler.has_room(model.seconds(params), Priority.LIVE) else RunStatus.DELIVERED
        try:
            async with self._claims:
                process = await self.db(self.store.create_process, session_id, inputs, status=status,
                                        owner=self.instance, parameters=stored_parameters(model, params),
                                        lease_s=self.serving.lease_s, priority=Priority.LIVE)
                self.in_hand.add(process.id)
                self.keep_leases()
        except BaseException:
            self.answering -= 1
            raise
        running = asyncio.ensure_future(self.generate(process, model, params, priority=Priority.LIVE,
                                                      partial_images=partial_images))

        def answered(_: asyncio.Task) -> None:
            self.answering -= 1
            self.in_hand.discard(process.id)

        running.add_done_callback(answered)
        return LiveCall(process.id, model, params, running)

    async def run_now(
        self,
        session_id: int,
        inputs: list[tuple[str, str]],
        model: ServedModel,
        params: GenerationParameters,
        client_gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> Finished:
        """Store a new process and run it while the caller waits (see `start_live`).

        If `client_gone` says the caller left, or the caller is cancelled, the process is
        cancelled (its slot freed, its call stopped where nothing else in it is wanted); for
        the first, ClientGone is raised.
        """
        live = await self.start_live(session_id, inputs, model, params)
        try:
            while client_gone is not None and not live.running.done():
                await asyncio.wait({live.running}, timeout=CLIENT_POLL_S)
                if not live.running.done() and await client_gone():
                    await self.stop_live(live)
                    raise ClientGone(f"The client of process {live.process_id} went away; it was cancelled.")
            return await asyncio.shield(live.running)
        except asyncio.CancelledError:  # this request itself cancelled (the server stopping, say): so is its work
            self.abandon(live)
            raise

    async def previews(self, live: LiveCall, since: int) -> list[Image.Image]:
        """The live call's partial images from the `since`-th on, once the model has decoded them."""
        return await self._previews(live.process_id, live.model, (live.params.width, live.params.height), since)

    async def process_previews(self, process: GenerativeProcess, since: int) -> list[Image.Image]:
        """A stored process's partial images from the `since`-th on, while it runs on this replica (the
        model's worker here holds them) and was asked for some."""
        stored = process.parameters or {}
        if not stored.get("partial_images") or process.id not in self.pending:
            return []
        model = self.settings.served_model(stored.get("model"))
        return await self._previews(process.id, model, (stored["width"], stored["height"]), since)

    async def _previews(self, process_id: int, model: ServedModel, asked: tuple[int, int],
                        since: int) -> list[Image.Image]:
        if self.progress.previews_ready.get(process_id, 0) <= since:
            return []
        return [resized(image, *asked) for image in await self.model.previews(process_id, since, model.drawn(*asked))]

    async def stop_live(self, live: LiveCall) -> None:
        """Cancel a live call: its process ends ERROR "cancelled", the model stops its call at
        the next step if nothing else in it is wanted."""
        if not live.running.done():
            await self._stop(live.process_id, live.running)

    def abandon(self, live: LiveCall) -> None:
        """`stop_live` from a caller that is being cancelled itself and cannot wait for it."""
        stopping = asyncio.ensure_future(self.stop_live(live))
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
