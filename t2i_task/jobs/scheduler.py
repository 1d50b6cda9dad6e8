"""What the model works on next: work is handed over only when the model can finish it in time.

Every generation, live (an OpenAI call whose client waits) or queued (a stored
DashAI process), asks `ModelScheduler.slot(...)` before it is sent to the model
service. The scheduler hands work over in order of priority (live before
queued); within one priority, owners (API keys) take turns, and each owner's
work goes first come first served, so one key's 100 queued jobs hold another
key's single request back by about one batch, not by 100 jobs: an owner with
nothing at the model may be handed one request past `max_at_model`, so that it
joins the next call (where owners take turns too: t2i_task/jobs/model_calls.py)
rather than the one after the work handed over already. It hands work over only
while

- the estimated seconds of work at the model, this one included, fit in the
  time a model call may take (`Settings.model_call_budget_s`): every call then
  finishes within its timeout however much work waits, because waiting here
  does not count toward it; and
- fewer than `max_at_model` requests are there: about two of BentoML's batches,
  so that a live request arriving later is not queued behind everything.

It also answers how long a new live request would wait (`wait_s`): the HTTP
layer refuses one that could not finish in time with 429 and that wait as
Retry-After. Only work of the same or a higher priority counts: queued
processes never make a live request wait longer than the work already handed
over.

Bulk lines (OpenAI's Batch API) take what is left, so that a live request never
waits for more than the call already running: they are handed over only while no
other work is at the model or waits; never within `bulk_hold_s` of other work
leaving the model (a client that got its answer sends its next request within
that time, and finds the model free); one at a time while other work used the
model in the last `bulk_alone_s` (the call a live request may find running is
then one line); and as fully as other work when the model has been theirs alone
for longer. Bulk work at the model never keeps other work from being handed over
(the call batcher sends other work first: t2i_task/jobs/model_calls.py), nor
counts in the wait a live request is refused for.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from t2i_task.storage.tables import Priority  # stored with each process


@dataclass(order=True)
class _Waiter:
    priority: Priority
    turn: int  # its owner's turn: owners with work waiting take turns (round-robin)
    arrival: int
    cost_s: float = field(compare=False)
    granted: asyncio.Future = field(compare=False)
    owner: str = field(default="", compare=False)


class ModelScheduler:
    def __init__(self, budget_s: float, max_at_model: int, bulk_hold_s: float = 0.0, bulk_alone_s: float = 0.0) -> None:
        self.budget_s = budget_s
        self.max_at_model = max_at_model
        self.bulk_hold_s, self.bulk_alone_s = bulk_hold_s, bulk_alone_s
        self.at_model_s = 0.0  # estimated seconds of the work handed over and not yet back
        self.at_model = 0  # requests handed over and not yet back
        self.bulk_at_model_s = 0.0  # of which bulk lines
        self.bulk_at_model = 0
        self._others_seen = -math.inf  # when other work than bulk lines last came, went to or left the model
        self._waiting: list[_Waiter] = []  # kept sorted: priority, then turn, then arrival
        self._arrivals = itertools.count()
        self._turn = 0  # the turn of the work handed over last
        self._owner_turns: dict[str, int] = {}  # the last turn each owner with work waiting was given
        self._owners_at_model: Counter = Counter()  # requests handed over and not yet back, by owner
        self._recheck: asyncio.TimerHandle | None = None  # a hand-over after a bulk hold

    def waiting_s(self, priority: Priority) -> float:
        """Estimated seconds of work ahead of a new request of `priority` (bulk work goes after
        other work, and counts only for bulk)."""
        at_model_s = self.at_model_s if priority >= Priority.BULK else self.at_model_s - self.bulk_at_model_s
        return at_model_s + sum(w.cost_s for w in self._waiting if w.priority <= priority)

    def wait_s(self, cost_s: float, priority: Priority) -> float:
        """How long a new request costing `cost_s` would wait before it could finish within the
        budget: 0 if it can be handed over in time now (the work ahead of it plus its own fits)."""
        return max(0.0, self.waiting_s(priority) + cost_s - self.budget_s)

    def has_room(self, cost_s: float, priority: Priority) -> bool:
        """Whether `slot` would hand this work over at once (nothing of its priority or a higher
        one waits, and it fits)."""
        return not any(w.priority <= priority for w in self._waiting) and self._has_room_for(cost_s, priority)

    def _has_room_for(self, cost_s: float, priority: Priority, owner: str | None = None) -> bool:
        others, others_s = self.at_model - self.bulk_at_model, self.at_model_s - self.bulk_at_model_s
        if priority < Priority.BULK:
            # Work larger than the whole budget (stored before the limits changed) runs alone; an owner
            # with nothing at the model may go one past max_at_model (fair share, above).
            first_of_owner = owner is not None and self._owners_at_model[owner] == 0
            return ((others_s + cost_s <= self.budget_s or others == 0)
                    and (others < self.max_at_model or first_of_owner))
        if others:
            return False
        quiet_s = time.monotonic() - self._others_seen
        if quiet_s < self.bulk_hold_s:
            self._hand_over_in(self.bulk_hold_s - quiet_s)
            return False
        if quiet_s < self.bulk_alone_s:
            return self.at_model == 0
        fits = self.at_model_s + cost_s <= self.budget_s or self.at_model == 0
        return fits and self.at_model < self.max_at_model

    def _hand_over_in(self, delay_s: float) -> None:
        if self._recheck is None or self._recheck.cancelled():
            def recheck() -> None:
                self._recheck = None
                self._hand_over()
            self._recheck = asyncio.get_running_loop().call_later(delay_s, recheck)

    @asynccontextmanager
    async def slot(self, cost_s: float, priority: Priority, owner: str = "") -> AsyncIterator[None]:
        """Wait until the model has room for this work and it is its owner's turn; hold it while the model
        runs it."""
        turn = max(self._owner_turns.get(owner, 0), self._turn) + 1  # after its owner's other work, and now
        self._owner_turns[owner] = turn
        waiter = _Waiter(priority, turn, next(self._arrivals), cost_s, asyncio.get_running_loop().create_future(),
                         owner)
        if priority < Priority.BULK:
            self._others_seen = time.monotonic()
        self._waiting.append(waiter)
        self._waiting.sort()
        self._hand_over()
        try:
            await waiter.granted
        except BaseException:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._hand_over()  # the work behind it may fit now
            elif not waiter.granted.cancelled():
                self._release(waiter)  # granted just as it was cancelled
            raise
        try:
            yield
        finally:
            self._release(waiter)

    def _release(self, waiter: _Waiter) -> None:
        self.at_model_s = max(0.0, self.at_model_s - waiter.cost_s)
        self.at_model -= 1
        self._owners_at_model[waiter.owner] -= 1
        if self._owners_at_model[waiter.owner] <= 0:
            del self._owners_at_model[waiter.owner]
        if waiter.priority >= Priority.BULK:
            self.bulk_at_model_s = max(0.0, self.bulk_at_model_s - waiter.cost_s)
            self.bulk_at_model -= 1
        else:
            self._others_seen = time.monotonic()
        self._hand_over()

    def _hand_over(self) -> None:
        """Grant waiters in order while they fit; the first that does not fit stops the line,
        so a large request is never overtaken forever by small ones, except by the work of an owner
        with nothing at the model whose turn is the head's (fair share: it goes one past
        `max_at_model`, so a key's single request never waits behind another key's queue)."""
        while self._waiting:
            head = self._waiting[0]
            if head.granted.cancelled():  # its task is unwinding; it holds nothing
                self._waiting.pop(0)
                continue
            if self._has_room_for(head.cost_s, head.priority, head.owner):
                self._grant(head)
                continue
            newcomer = next((w for w in self._waiting[1:] if (w.priority, w.turn) == (head.priority, head.turn)
                             and not w.granted.cancelled() and self._owners_at_model[w.owner] == 0
                             and self._has_room_for(w.cost_s, w.priority, w.owner)), None)
            if newcomer is None:
                return
            self._grant(newcomer)

    def _grant(self, waiter: _Waiter) -> None:
        self._waiting.remove(waiter)
        self._turn = max(self._turn, waiter.turn)
        if self._owner_turns.get(waiter.owner, 0) <= self._turn:
            self._owner_turns.pop(waiter.owner, None)  # nothing of theirs waits after this
        self.at_model_s += waiter.cost_s
        self.at_model += 1
        self._owners_at_model[waiter.owner] += 1
        if waiter.priority >= Priority.BULK:
            self.bulk_at_model_s += waiter.cost_s
            self.bulk_at_model += 1
        else:
            self._others_seen = time.monotonic()
        waiter.granted.set_result(None)
