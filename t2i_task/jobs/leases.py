"""Work held under leases, so that replicas take over each other's work.

Every process a replica stores or takes is held under a lease in the database
(t2i_task/storage/process_rows.py). The replica renews the leases of all it holds every
`serving.lease_s / 3` (2 s at most), in one statement; the same statement tells it which of
its processes were ended or taken over elsewhere (cancelled through another replica, deleted,
or taken after its lease expired while this replica hung), and it stops those at once.

Now and then, and whenever its model has room after more work was seen waiting, a replica
claims work nobody holds: its own after a restart (all of it), work released by a replica
that stopped (SIGTERM), and work whose lease expired (its replica died), as much as its model
has room for, so that the work spreads over the replicas that are free. What waits is
counted by priority at each sweep, for autoscaling.

`Leases` is the part of `ProcessQueue` (processes.py) that does this.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 15  # at most, between two looks for unheld work (lease_s / 2 when that is shorter)
RENEW_INTERVAL_S = 2.0  # at most, between two lease renewals (lease_s / 3 when that is shorter)


class Leases:
    """ProcessQueue's methods for leases (it provides the state they use)."""

    def keep_leases(self) -> None:
        """Renew this replica's leases from now on (from its first process: before `start`, the
        model may still be loading while work is accepted)."""
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew())

    def room(self) -> int:
        """How much more unheld work this replica takes now: enough for the model's next two
        batches behind what it holds, within what it may admit."""
        held = len(self.pending) + self.answering
        return max(0, min(2 * self.scheduler.max_at_model - len(self.pending),
                          self.serving.max_queued_generations - held))

    def work_stored(self) -> None:
        """Unheld work was just stored here (a batch's lines): look for it at once."""
        self._more_waiting = True
        self.room_made()

    def room_made(self) -> None:
        """A process here ended: look for more at once if more was seen waiting."""
        if self._more_waiting and not self.draining:
            self._more_work.set()

    async def take_unheld_work(self) -> None:
        """Claim this replica's interrupted work and, as far as there is room, work nobody holds."""
        limit = self.room()
        async with self._claims:
            queued, ended = await self.db(
                self.store.claim, self.instance, self.serving.lease_s, self.serving.max_attempts,
                exclude=set(self.pending) | self.in_hand, limit=limit,
            )
            for process in queued:
                self.accept(process)
        self._more_waiting = len(queued) >= limit > 0  # the limit was reached: more may wait
        if queued or ended:
            log.warning("took %d unheld processes, ended %d (interrupted too often, or live)", len(queued), len(ended))

    async def _sweep(self) -> None:
        """Now and then, or as soon as there is room for work seen waiting, take unheld work and
        count what waits."""
        interval = min(SWEEP_INTERVAL_S, self.serving.lease_s / 2)
        while not self.draining:
            self._more_work.clear()
            try:
                await asyncio.wait_for(self._more_work.wait(), interval)
            except TimeoutError:
                pass
            try:
                await self.take_unheld_work()
                await self.end_batches()  # t2i_task/jobs/batches.py
                if self.report_stored is not None:
                    self.report_stored(await self.db(self.store.waiting_by_priority), await self.db(self.store.usage))
            except Exception as exc:  # the database may still be away: try again later
                log.warning("sweep skipped: %s", type(exc).__name__)

    async def _renew(self) -> None:
        interval = min(RENEW_INTERVAL_S, self.serving.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            held_here = set(self.pending) | self.in_hand
            if not held_here:
                continue
            try:
                held = await self.db(self.store.renew_leases, self.instance, held_here, self.serving.lease_s)
            except Exception as exc:  # the database away: whoever holds a process at the end decides
                log.warning("leases not renewed: %s", type(exc).__name__)
                continue
            for process_id in held_here - held:
                await self._let_go(process_id)

    async def _let_go(self, process_id: int) -> None:
        """Stop working on a process ended or taken over elsewhere; generate() stores nothing of it.
        One whose images are being written is left to finish_process, which then refuses."""
        job = self.pending.get(process_id)
        if job is None or job.done() or process_id in self.saving or process_id in self.cancelling:
            return  # a live call (its finish is refused), or one that just ended here
        log.warning("process %s was ended or taken over elsewhere; stopping it here", process_id)
        self.lost.add(process_id)
        if process_id in self.at_model:
            try:
                await self.model.cancel([process_id])
            except Exception as exc:  # the model service busy or away: its result is dropped all the same
                log.debug("cancel at the model failed: %s", type(exc).__name__)
        job.cancel()
