"""Requests to the model joined into calls: one call to the model service carries every
request waiting for it, up to a batch.

Each call to the model service costs its worker a few milliseconds of Python (HTTP,
pickling, BentoML's middlewares), and that worker's Python shares the GIL with the
pipeline's: at concurrency 16 the per-request calls cost about 9% of the throughput
on 2 cores (docs/benchmarks.md). So a request is sent at once when the model is idle;
while a call runs, requests wait here, and go as the next call when the running call
ends. With `max_in_flight=2`, a full batch that has gathered goes at once instead and
queues at the model, which starts it the moment the running call ends. The server
keeps one call in flight by default (`batching.calls_in_flight`): BentoML's
dispatcher polls every millisecond while a call waits at it (its `TICKET_INTERVAL`),
and that polling took about 2% of the throughput at concurrency 16 from the
pipeline's share of the GIL, more than the gap between two calls costs.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class CallBatcher(Generic[Request, Result]):
    """`key`, if given, says which requests may share a call (GenerationRequest.batch_key: the same
    model, size and steps): a call carries the first waiting request, by rank (the scheduler's
    priority: a live request before bulk lines handed over earlier) and then by arrival, and those
    of its key, in the same order, up to a batch, so that two models' requests waiting together go
    as two full calls, not two half pipeline calls in each. Within a rank, owners (API keys) take
    turns in a call: each owner's first waiting request, then each one's second, and so on, so a
    request of a key that has one waits for the running call only, not for another key's queue. `sent`, if given, learns of each call as it goes (it must not raise):
    it runs beside the call, never delaying it, and the call's callers get their results once it
    is done too."""

    def __init__(self, call: Callable[[list[Request]], Awaitable[Sequence[Result]]], max_batch: int,
                 max_in_flight: int = 2, sent: Callable[[list[Request]], Awaitable[None]] | None = None,
                 key: Callable[[Request], Hashable] = lambda request: None) -> None:
        self.call, self.max_batch, self.max_in_flight, self.sent = call, max_batch, max_in_flight, sent
        self.key = key
        self.waiting: deque[tuple[Request, asyncio.Future, int, str]] = deque()  # request, result, rank, owner
        self.in_flight = 0
        self._calls: set[asyncio.Task] = set()

    async def submit(self, request: Request, rank: int = 0, owner: str = "") -> Result:
        """The request's result, from the call it joined (lower `rank`s go first, `owner`s take turns); its
        exception if that call failed. Cancelling the caller takes the request out if it has not been sent yet."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future, rank, owner))
        self._send_what_waits()
        return await future

    def _send_what_waits(self) -> None:
        while self.in_flight < self.max_in_flight:
            # A caller that left is not sent.
            self.waiting = deque(item for item in self.waiting if not item[1].done())
            if not self.waiting:
                return
            in_order = sorted(self.waiting, key=lambda item: item[2])  # by rank, then arrival (a stable sort)
            head_key = self.key(in_order[0][0])
            batch = _owners_in_turn([item for item in in_order if self.key(item[0]) == head_key])[:self.max_batch]
            if self.in_flight and len(batch) < self.max_batch:
                return  # a part batch goes when the model is free, with what joins it until then
            sent = {id(item) for item in batch}
            self.waiting = deque(item for item in self.waiting if id(item) not in sent)
            self.in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._calls.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._calls.discard)

    async def _run(self, batch: list[tuple[Request, asyncio.Future, int, str]]) -> None:
        waiting = [future for _, future, _, _ in batch]
        requests = [request for request, _, _, _ in batch]
        noting = asyncio.ensure_future(self.sent(requests)) if self.sent else None
        try:
            try:
                results = await self.call(requests)
            finally:
                if noting is not None:
                    await asyncio.shield(noting)
        except Exception as exc:  # every caller of the call gets its failure
            for future in waiting:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # this task cancelled (the server stopping): so are its callers
            for future in waiting:
                future.cancel()
            raise
        else:
            for (_, future, _, _), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self.in_flight -= 1
            self._send_what_waits()


def _owners_in_turn(in_order: list[tuple]) -> list[tuple]:
    """Requests (in rank, then arrival order) with owners taking turns within each rank: the stable
    sort by (rank, how many of its owner's go before it) keeps each owner's own order."""
    seen: Counter = Counter()
    nth = []
    for _, _, rank, owner in in_order:
        nth.append(seen[rank, owner])
        seen[rank, owner] += 1
    return [item for _, item in sorted(zip(nth, in_order), key=lambda pair: (pair[1][2], pair[0]))]
