"""ModelScheduler: work reaches the model only when it can finish in time, live requests first."""

from __future__ import annotations

import asyncio

import pytest

from t2i_task.jobs.scheduler import ModelScheduler, Priority


async def hold(scheduler: ModelScheduler, cost_s: float, priority: Priority, order: list, name: str,
               release: asyncio.Event) -> None:
    async with scheduler.slot(cost_s, priority):
        order.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coroutine):
    return asyncio.run(coroutine)


def test_work_is_handed_over_only_while_it_fits_the_budget():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        order: list[str] = []
        releases = {name: asyncio.Event() for name in "abc"}
        tasks = [asyncio.create_task(hold(scheduler, 4, Priority.QUEUED, order, name, releases[name])) for name in "abc"]
        await settle()
        assert order == ["a", "b"] and scheduler.at_model_s == 8  # c (4 s more) would not finish in time
        releases["a"].set()
        await settle()
        assert order == ["a", "b", "c"]
        for event in releases.values():
            event.set()
        await asyncio.gather(*tasks)
        assert scheduler.at_model_s == 0 and scheduler.at_model == 0

    run(scenario())


def test_live_requests_go_before_queued_processes_that_came_first():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        order: list[str] = []
        release = asyncio.Event()
        first = asyncio.create_task(hold(scheduler, 8, Priority.QUEUED, order, "running", release))
        await settle()
        queued = asyncio.create_task(hold(scheduler, 5, Priority.QUEUED, order, "queued", release))
        await settle()
        live = asyncio.create_task(hold(scheduler, 5, Priority.LIVE, order, "live", release))
        await settle()
        assert order == ["running"]
        # Queued processes do not count toward a live request's wait; the work handed over does.
        assert scheduler.waiting_s(Priority.LIVE) == 8 + 5  # running + the live one waiting
        assert scheduler.waiting_s(Priority.QUEUED) == 8 + 5 + 5
        release.set()
        await asyncio.gather(first, queued, live)
        assert order == ["running", "live", "queued"]

    run(scenario())


def test_a_large_request_is_not_overtaken_by_smaller_ones_behind_it():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("a", "big", "small")}
        tasks = [asyncio.create_task(hold(scheduler, 6, Priority.QUEUED, order, "a", release["a"]))]
        await settle()
        tasks.append(asyncio.create_task(hold(scheduler, 9, Priority.QUEUED, order, "big", release["big"])))
        tasks.append(asyncio.create_task(hold(scheduler, 1, Priority.QUEUED, order, "small", release["small"])))
        await settle()
        assert order == ["a"]  # "small" would fit beside "a", but "big" came first
        release["a"].set()
        await settle()
        assert order == ["a", "big", "small"]
        for event in release.values():
            event.set()
        await asyncio.gather(*tasks)

    run(scenario())


def test_no_more_requests_than_max_at_model_and_a_request_above_the_budget_runs_alone():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=2)
        order: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(hold(scheduler, 1, Priority.QUEUED, order, str(i), release)) for i in range(3)]
        tasks.append(asyncio.create_task(hold(scheduler, 30, Priority.QUEUED, order, "huge", release)))
        await settle()
        assert order == ["0", "1"]
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["0", "1", "2", "huge"]

    run(scenario())


def test_a_cancelled_waiter_leaves_the_line_and_frees_nothing_it_did_not_hold():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("a", "gone", "c")}
        a = asyncio.create_task(hold(scheduler, 8, Priority.QUEUED, order, "a", release["a"]))
        await settle()
        gone = asyncio.create_task(hold(scheduler, 5, Priority.QUEUED, order, "gone", release["gone"]))
        c = asyncio.create_task(hold(scheduler, 2, Priority.QUEUED, order, "c", release["c"]))
        await settle()
        assert order == ["a"]
        gone.cancel()  # its client went away while it waited
        await settle()
        assert order == ["a", "c"] and scheduler.at_model_s == 10
        release["a"].set()
        release["c"].set()
        await asyncio.gather(a, c)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert scheduler.at_model_s == 0 and scheduler.at_model == 0

    run(scenario())


def test_the_wait_a_live_request_is_told_grows_with_the_work_ahead_of_it():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        assert scheduler.wait_s(6, Priority.LIVE) == 0
        order: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(hold(scheduler, 6, Priority.LIVE, order, "a", release))]
        await settle()
        first = scheduler.wait_s(6, Priority.LIVE)
        tasks.append(asyncio.create_task(hold(scheduler, 3, Priority.LIVE, order, "b", release)))
        await settle()
        second = scheduler.wait_s(6, Priority.LIVE)
        assert (first, second) == (2, 5)
        # Queued processes waiting change nothing for a live request.
        tasks.append(asyncio.create_task(hold(scheduler, 4, Priority.QUEUED, order, "q", release)))
        await settle()
        assert scheduler.wait_s(6, Priority.LIVE) == 5
        release.set()
        await asyncio.gather(*tasks)

    run(scenario())


def test_a_waiter_cancelled_just_before_its_turn_is_skipped_not_granted():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=16)
        order: list[str] = []
        held = scheduler.slot(8, Priority.QUEUED)
        await held.__aenter__()
        gone = asyncio.create_task(hold(scheduler, 3, Priority.QUEUED, order, "gone", asyncio.Event()))
        await settle()  # it waits: 8 + 3 s do not fit
        gone.cancel()  # its client left; before its task unwinds, the room it waited for frees up
        await held.__aexit__(None, None, None)
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert order == [] and scheduler.at_model_s == 0 and scheduler.at_model == 0

    run(scenario())


def test_has_room_says_whether_work_would_be_handed_over_at_once():
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=2)
        order: list[str] = []
        release = asyncio.Event()
        assert scheduler.has_room(4, Priority.LIVE)
        first = asyncio.create_task(hold(scheduler, 8, Priority.QUEUED, order, "running", release))
        await settle()
        assert not scheduler.has_room(4, Priority.LIVE)  # 12 s would not finish in time
        assert scheduler.has_room(2, Priority.LIVE)
        waiting = asyncio.create_task(hold(scheduler, 5, Priority.LIVE, order, "waiting", release))
        await settle()
        assert not scheduler.has_room(1, Priority.LIVE)  # a live request waits ahead of it
        release.set()
        await asyncio.gather(first, waiting)
        assert order == ["running", "waiting"] and scheduler.has_room(4, Priority.LIVE)

    run(scenario())


def test_bulk_lines_take_the_model_only_once_other_work_has_left_it_for_the_hold():
    async def scenario():
        scheduler = ModelScheduler(budget_s=100, max_at_model=16, bulk_hold_s=0.2, bulk_alone_s=0.0)
        order: list[str] = []
        release = {name: asyncio.Event() for name in ("live", "live-2", "bulk-1", "bulk-2")}
        live = asyncio.create_task(hold(scheduler, 1, Priority.LIVE, order, "live", release["live"]))
        await settle()
        bulk = [asyncio.create_task(hold(scheduler, 1, Priority.BULK, order, name, release[name]))
                for name in ("bulk-1", "bulk-2")]
        await settle()
        assert order == ["live"], "no bulk line beside other work at the model"
        assert scheduler.waiting_s(Priority.LIVE) == 1 and scheduler.wait_s(1, Priority.LIVE) == 0
        release["live"].set()
        await asyncio.sleep(0.1)
        assert order == ["live"], "held after the live request left: its client's next one finds the model free"
        await asyncio.sleep(0.2)
        assert order == ["live", "bulk-1", "bulk-2"], "the model alone long enough: bulk lines go in full"
        # Bulk work at the model neither blocks a live request nor counts in its wait.
        newcomer = asyncio.create_task(hold(scheduler, 1, Priority.LIVE, order, "live-2", release["live-2"]))
        await settle()
        assert order[-1] == "live-2" and scheduler.waiting_s(Priority.LIVE) == 1
        for event in release.values():
            event.set()
        await asyncio.gather(live, newcomer, *bulk)
        assert (scheduler.at_model, scheduler.bulk_at_model, scheduler.at_model_s) == (0, 0, 0)

    run(scenario())


def test_bulk_lines_go_one_at_a_time_while_other_work_was_recent():
    async def scenario():
        scheduler = ModelScheduler(budget_s=100, max_at_model=16, bulk_hold_s=0.0, bulk_alone_s=60)
        order: list[str] = []
        releases = {name: asyncio.Event() for name in ("queued", "queued-2", "a", "b", "c")}
        tasks = [asyncio.create_task(hold(scheduler, 1, Priority.QUEUED, order, "queued", releases["queued"]))]
        await settle()
        tasks += [asyncio.create_task(hold(scheduler, 1, Priority.BULK, order, name, releases[name])) for name in "abc"]
        await settle()
        releases["queued"].set()
        await settle()
        assert order == ["queued", "a"], "one line at a time"
        releases["a"].set()
        await settle()
        assert order == ["queued", "a", "b"]
        queued = asyncio.create_task(hold(scheduler, 1, Priority.QUEUED, order, "queued-2", releases["queued-2"]))
        await settle()
        assert order[-1] == "queued-2", "other work goes beside the line running"
        releases["b"].set()
        await settle()
        assert "c" not in order, "no bulk line beside other work"
        for event in releases.values():
            event.set()
        await asyncio.gather(queued, *tasks)
        assert order[-1] == "c"

    run(scenario())


def test_owners_take_turns_so_one_keys_queue_holds_anothers_request_back_by_one_hand_over():
    """Key a queues 6 jobs while the model is full, then key b queues one: b's is handed over at once (one
    past max_at_model: b has nothing at the model), not after a's six; each owner's own work stays first
    come first served."""
    async def scenario():
        scheduler = ModelScheduler(budget_s=10, max_at_model=1)
        order: list[str] = []
        release = asyncio.Event()

        async def job(name: str, owner: str) -> None:
            async with scheduler.slot(1, Priority.QUEUED, owner):
                order.append(name)
                await release.wait()

        running = asyncio.create_task(job("running", "a"))
        await settle()
        tasks = [asyncio.create_task(job(f"a{n}", "a")) for n in range(6)]
        await settle()
        tasks.append(asyncio.create_task(job("b0", "b")))
        await settle()
        for _ in range(7):  # the model takes one at a time
            release.set()
            await settle()
            release.clear()
        release.set()
        await asyncio.gather(running, *tasks)
        assert order == ["running", "b0", "a0", "a1", "a2", "a3", "a4", "a5"]
        assert scheduler.at_model == 0

    run(scenario())
