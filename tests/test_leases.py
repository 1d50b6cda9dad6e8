"""Leases in the store, on SQLite and on PostgreSQL: who holds a process, who may write to it, who takes it."""

from __future__ import annotations

import threading
import time

import pytest

from t2i_task.storage.store import InvalidTransition, LeaseLost, Store
from t2i_task.storage.tables import Priority, RunStatus

TASK = "TextToImageGenerationTask"


@pytest.fixture
def session_id(store: Store) -> int:
    return store.create_session(task_name=TASK, name="leases", parameters={}).id


def new(store: Store, session_id: int, owner: str = "a", lease_s: float = 60, **kwargs):
    return store.create_process(session_id, [("a prompt", "str")], owner=owner, lease_s=lease_s, **kwargs)


def test_renewal_returns_what_the_replica_still_holds(store, session_id):
    kept, cancelled, taken = (new(store, session_id) for _ in range(3))
    store.fail_process(cancelled.id, "cancelled")  # through another replica: no holder
    store.release("a", [taken.id])
    store.claim("b", lease_s=60, max_attempts=3)

    assert store.renew_leases("a", [kept.id, cancelled.id, taken.id], lease_s=60) == {kept.id}
    assert store.renew_leases("b", [kept.id, taken.id], lease_s=60) == {taken.id}
    assert store.renew_leases("a", [], lease_s=60) == set()


def test_a_replica_that_lost_its_process_writes_nothing_to_it(store, session_id):
    process = new(store, session_id, lease_s=0.2)
    store.start_processes([process.id], holder="a")
    time.sleep(0.3)
    [taken], _ = store.claim("b", lease_s=60, max_attempts=3)
    assert taken.id == process.id and taken.status is RunStatus.DELIVERED and taken.owner == "b"

    store.start_processes([process.id], holder="a")  # a's call is sent late: not stamped
    assert store.get_process(process.id).status is RunStatus.DELIVERED
    with pytest.raises(LeaseLost, match="replica 'b' holds it"):
        store.finish_process(process.id, [("a.png", "Image")], holder="a")
    with pytest.raises(LeaseLost):
        store.fail_process(process.id, "out of memory", holder="a")
    assert store.release("a", [process.id]) == 0

    store.start_processes([process.id], holder="b")
    store.finish_process(process.id, [("b.png", "Image")], holder="b")
    finished = store.get_process(process.id)
    assert finished.status is RunStatus.FINISHED and [row.data for row in finished.output] == ["b.png"]
    with pytest.raises(InvalidTransition):  # ended: no second result from anyone
        store.finish_process(process.id, [("a.png", "Image")], holder="a")


def test_a_claim_takes_released_and_expired_work_but_not_held_work(store, session_id):
    held = new(store, session_id, owner="a", lease_s=60)
    released = new(store, session_id, owner="a", lease_s=60)
    expired = new(store, session_id, owner="c", lease_s=0.2)
    store.start_processes([released.id, expired.id], holder=None)
    legacy = store.create_process(session_id, [("before leases", "str")], owner="d")  # no lease: d's alone
    assert store.release("a", [released.id]) == 1
    back = store.get_process(released.id)
    assert (back.status, back.owner, back.lease_expires) == (RunStatus.DELIVERED, None, None)
    time.sleep(0.3)

    taken, ended = store.claim("b", lease_s=60, max_attempts=3)

    assert [p.id for p in taken] == [released.id, expired.id] and not ended
    assert {store.get_process(p.id).owner for p in taken} == {"b"}
    assert all(store.get_process(p.id).status is RunStatus.DELIVERED for p in taken), "running work is queued again"
    assert store.get_process(held.id).owner == "a"
    assert store.get_process(legacy.id).owner == "d"
    assert store.claim("c", lease_s=60, max_attempts=3) == ([], []), "b holds them now"


def test_a_claim_takes_no_more_than_its_room_but_all_of_its_own(store, session_id):
    mine = [new(store, session_id, owner="b") for _ in range(2)]
    released = [new(store, session_id, owner="a") for _ in range(5)]
    store.release("a", [p.id for p in released])

    taken, _ = store.claim("b", lease_s=60, max_attempts=3, exclude=[mine[0].id], limit=2)
    assert [p.id for p in taken] == [mine[1].id, released[0].id, released[1].id]
    in_hand = [p.id for p in mine + taken]
    assert store.claim("b", lease_s=60, max_attempts=3, exclude=in_hand, limit=0) == ([], [])
    taken, _ = store.claim("b", lease_s=60, max_attempts=3, exclude=in_hand, limit=10)
    assert [p.id for p in taken] == [p.id for p in released[2:]]


def test_a_live_process_whose_replica_died_ends_with_a_reason(store, session_id):
    live = new(store, session_id, owner="a", lease_s=0.2, status=RunStatus.STARTED, priority=Priority.LIVE)
    queued = new(store, session_id, owner="a", lease_s=0.2)
    time.sleep(0.3)
    taken, ended = store.claim("b", lease_s=60, max_attempts=3)
    assert [p.id for p in taken] == [queued.id] and [p.id for p in ended] == [live.id]
    stopped = store.get_process(live.id)
    assert stopped.status is RunStatus.ERROR
    assert "the server answering this request (a) stopped" in stopped.output[0].data


def test_what_waits_is_counted_by_priority(store, session_id):
    for _ in range(3):
        new(store, session_id)
    new(store, session_id, priority=Priority.LIVE)
    running = new(store, session_id)
    store.start_processes([running.id], holder="a")
    assert store.waiting_by_priority() == {Priority.LIVE: 1, Priority.QUEUED: 3, Priority.BULK: 0}


def test_two_replicas_claiming_at_once_never_take_the_same_process(store, session_id):
    if store.engine.dialect.name != "postgresql":
        pytest.skip("replicas on several machines share PostgreSQL (FOR UPDATE SKIP LOCKED); SQLite is one node")
    processes = [new(store, session_id, owner="gone", lease_s=0.1) for _ in range(60)]
    time.sleep(0.2)
    taken: dict[str, list[int]] = {}

    def claim(replica: str) -> None:
        ids: list[int] = []
        while batch := store.claim(replica, lease_s=60, max_attempts=3, exclude=ids, limit=3)[0]:
            ids += [p.id for p in batch]
        taken[replica] = ids

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(taken["a"]).isdisjoint(taken["b"]), "no process taken twice"
    assert sorted(taken["a"] + taken["b"]) == [p.id for p in processes], "every process taken"
    assert taken["a"] and taken["b"], "both replicas took work"
