"""Requests joined into calls to the model (t2i_task/jobs/model_calls.py), on a model stand-in that records its calls."""

from __future__ import annotations

import asyncio

import pytest

from t2i_task.jobs.model_calls import CallBatcher


class RecordingModel:
    """Answers each request with itself doubled, once `release` is set for the call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.release: list[asyncio.Event] = []

    async def call(self, requests: list[int]) -> list[int]:
        self.calls.append(list(requests))
        event = asyncio.Event()
        self.release.append(event)
        await event.wait()
        if -1 in requests:
            raise RuntimeError("the model service is gone")
        return [r * 2 for r in requests]


@pytest.fixture
def model() -> RecordingModel:
    return RecordingModel()


@pytest.fixture
def batcher(model) -> CallBatcher:
    return CallBatcher(model.call, max_batch=8)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.anyio
async def test_requests_that_wait_behind_a_running_call_go_as_full_batches_then_the_rest(model, batcher):
    first = asyncio.create_task(batcher.submit(0))
    await settle()
    assert model.calls == [[0]], "the model was idle: sent at once"
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 16)]
    await settle()
    assert model.calls == [[0], list(range(1, 9))], "a full batch queues behind the running call"
    model.release[0].set()
    await settle()
    assert len(model.calls) == 2, "the part batch waits while a call is still at the model"
    model.release[1].set()
    await settle()
    assert model.calls[2] == list(range(9, 16))
    model.release[2].set()
    assert await first == 0 and [await task for task in rest] == [i * 2 for i in range(1, 16)]


@pytest.mark.anyio
async def test_a_failed_call_fails_each_of_its_requests_and_the_next_ones_still_run(model, batcher):
    first = asyncio.create_task(batcher.submit(7))
    await settle()
    doomed = [asyncio.create_task(batcher.submit(r)) for r in (-1, 3)]
    await settle()
    model.release[0].set()
    await settle()
    model.release[1].set()
    for task in doomed:
        with pytest.raises(RuntimeError, match="gone"):
            await task
    later = asyncio.create_task(batcher.submit(5))
    await settle()
    model.release[2].set()
    assert await first == 14 and await later == 10
    assert model.calls == [[7], [-1, 3], [5]]


@pytest.mark.anyio
async def test_a_caller_that_leaves_before_its_call_is_not_sent(model, batcher):
    running = asyncio.create_task(batcher.submit(1))
    await settle()
    leaving = asyncio.create_task(batcher.submit(2))
    staying = asyncio.create_task(batcher.submit(3))
    await settle()
    leaving.cancel()
    await settle()
    model.release[0].set()
    await settle()
    model.release[1].set()
    assert await running == 2 and await staying == 6
    assert model.calls == [[1], [3]]


@pytest.mark.anyio
async def test_with_one_call_in_flight_the_next_takes_what_waited_when_the_running_one_ends(model):
    batcher = CallBatcher(model.call, max_batch=8, max_in_flight=1)
    first = asyncio.create_task(batcher.submit(0))
    await settle()
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 12)]
    await settle()
    assert model.calls == [[0]], "nothing queues at the model behind the running call"
    model.release[0].set()
    await settle()
    assert model.calls == [[0], list(range(1, 9))]
    model.release[1].set()
    await settle()
    assert model.calls[2] == list(range(9, 12))
    model.release[2].set()
    assert await first == 0 and [await task for task in rest] == [i * 2 for i in range(1, 12)]


@pytest.mark.anyio
async def test_requests_of_two_keys_waiting_together_go_as_full_calls_of_one_key(model):
    """Two models' requests (even and odd here) queued behind a call: a call each, full, oldest key first."""
    batcher = CallBatcher(model.call, max_batch=4, max_in_flight=1, key=lambda request: request % 2)
    first = asyncio.create_task(batcher.submit(0))
    await settle()
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 9)]
    await settle()
    for index in range(3):
        model.release[index].set()
        await settle()
    assert model.calls == [[0], [1, 3, 5, 7], [2, 4, 6, 8]]
    assert await first == 0 and [await task for task in rest] == [i * 2 for i in range(1, 9)]


@pytest.mark.anyio
async def test_a_lower_rank_goes_in_the_next_call_ahead_of_requests_that_came_before_it(model):
    batcher = CallBatcher(model.call, max_batch=4, max_in_flight=1)
    running = asyncio.create_task(batcher.submit(0, rank=2))
    await settle()
    bulk = [asyncio.create_task(batcher.submit(i, rank=2)) for i in range(1, 6)]
    live = asyncio.create_task(batcher.submit(100, rank=0))
    await settle()
    model.release[0].set()
    await settle()
    assert model.calls[1] == [100, 1, 2, 3], "the live request first, then those that waited longest"
    model.release[1].set()
    await settle()
    model.release[2].set()
    assert await live == 200 and [await task for task in [running, *bulk]] == [i * 2 for i in range(6)]


@pytest.mark.anyio
async def test_owners_take_turns_in_a_call_so_one_keys_queue_does_not_fill_the_next_call(model):
    """Key a has 10 requests waiting behind the running call, key b then one: the next call carries b's
    with a's seven oldest, not a's eight."""
    batcher = CallBatcher(model.call, max_batch=8, max_in_flight=1)
    running = asyncio.create_task(batcher.submit(0, owner="a"))
    await settle()
    waiting = [asyncio.create_task(batcher.submit(n, owner="a")) for n in range(1, 11)]
    await settle()
    waiting.append(asyncio.create_task(batcher.submit(100, owner="b")))
    await settle()
    model.release[0].set()
    await settle()
    assert model.calls[1] == [1, 100, 2, 3, 4, 5, 6, 7]
    for event_index in (1, 2):
        await settle()
        model.release[event_index].set()
    await asyncio.gather(running, *waiting)
    assert model.calls[2] == [8, 9, 10]
