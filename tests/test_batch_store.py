"""Bulk jobs in the store (t2i_task/storage/batch_rows.py), on SQLite and PostgreSQL: a batch and its
lines stored whole, claimed after other work, finalized by one replica, cancelled, and forgotten
with the retention."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from t2i_task.storage.batch_rows import BatchLine, new_id
from t2i_task.storage.errors import BatchNotFound, FileNotFound
from t2i_task.storage.tables import Batch, Priority, RunStatus, utcnow


@pytest.fixture
def session_id(store) -> int:
    return store.create_session(task_name="TextToImageGenerationTask", model_name="m", name="s", parameters={}).id


def new_batch(store, session_id: int, custom_ids: list[str], invalid: tuple[str, ...] = ()) -> Batch:
    lines = [BatchLine(custom_id, session_id, [(f"prompt {custom_id}", "str")], {"num_inference_steps": 2},
                       error="size: too large" if custom_id in invalid else None) for custom_id in custom_ids]
    batch = Batch(id=new_id("batch_"), endpoint="/v1/images/generations", completion_window="24h",
                  input_file_id="file-x", expires_at=utcnow() + timedelta(hours=24))
    return store.create_batch(batch, lines)


def lines_of(store, batch_id: str):
    return [line for chunk in store.batch_lines(batch_id) for line in chunk]


def test_a_batch_is_stored_with_its_lines_and_an_invalid_line_ends_at_once(store, session_id):
    batch = new_batch(store, session_id, ["a", "b", "c"], invalid=("b",))
    assert store.get_batch(batch.id).status == "in_progress"
    lines = lines_of(store, batch.id)
    assert [(line.custom_id, line.status) for line in lines] == [
        ("a", RunStatus.DELIVERED), ("b", RunStatus.ERROR), ("c", RunStatus.DELIVERED)]
    assert lines[1].output[0].data == "Error details: size: too large" and lines[0].input[0].data == "prompt a"
    assert all(line.priority == Priority.BULK and line.owner is None for line in lines)
    counts = store.batch_counts([store.get_batch(batch.id)])[batch.id]
    assert (counts.total, counts.completed, counts.failed) == (3, 0, 1)
    with pytest.raises(BatchNotFound):
        store.get_batch("batch_missing")


def test_a_custom_id_twice_in_one_batch_stores_nothing(store, session_id):
    with pytest.raises(IntegrityError):
        new_batch(store, session_id, ["a", "a"])
    assert store.list_batches(10, None) == []


def test_batch_lines_are_claimed_after_other_waiting_work(store, session_id):
    batch = new_batch(store, session_id, ["a", "b"])
    queued = store.create_process(session_id, [("q", "str")], owner=None)
    taken, _ = store.claim("replica", lease_s=30, max_attempts=3, limit=2)
    assert [process.id for process in taken] == [queued.id, lines_of(store, batch.id)[0].id]


def test_one_replica_finalizes_a_batch_once_every_line_has_ended(store, session_id):
    batch = new_batch(store, session_id, ["a", "b"])
    first, second = lines_of(store, batch.id)
    store.claim("r1", lease_s=30, max_attempts=3)
    store.start_processes([first.id, second.id], holder="r1")
    store.finish_process(first.id, [("a.png", "Image")], holder="r1")
    assert store.take_batch_to_finalize(batch.id, "r1", 60) is None, "a line still runs"
    store.fail_process(second.id, "out of memory", holder="r1")
    assert store.batches_to_end() == ([], [batch.id])
    taken = store.take_batch_to_finalize(batch.id, "r1", 60)
    assert taken.status == "finalizing" and store.take_batch_to_finalize(batch.id, "r2", 60) is None
    assert store.batches_to_end() == ([], []), "held by a live replica"
    assert store.end_batch(batch.id, "r2", "file-out", None) is None, "only its holder ends it"
    ended = store.end_batch(batch.id, "r1", "file-out", "file-err")
    assert (ended.status, ended.output_file_id, ended.error_file_id) == ("completed", "file-out", "file-err")
    assert ended.completed_at is not None and store.take_batch_to_finalize(batch.id, "r2", 60) is None


def test_a_cancel_ends_the_lines_not_ended_and_keeps_the_finished_ones(store, session_id):
    batch = new_batch(store, session_id, ["a", "b", "c"])
    first, *_ = lines_of(store, batch.id)
    store.claim("r1", lease_s=30, max_attempts=3)
    store.start_processes([first.id], holder="r1")
    store.finish_process(first.id, [("a.png", "Image")], holder="r1")
    assert store.end_batch_lines(batch.id, "cancelled").status == "cancelling"
    assert [line.status for line in lines_of(store, batch.id)] == [RunStatus.FINISHED, RunStatus.ERROR,
                                                                   RunStatus.ERROR]
    assert store.renew_leases("r1", [line.id for line in lines_of(store, batch.id)], 30) == set(), \
        "its replica lets the cancelled lines go"
    taken = store.take_batch_to_finalize(batch.id, "r1", 60)
    assert taken.status == "cancelling", "cancelling until its results are written"
    assert store.end_batch(batch.id, "r1", None, "file-err").status == "cancelled"


def test_retention_forgets_ended_batches_with_their_lines_images_and_files(store, session_id):
    store.images.folder.mkdir(parents=True, exist_ok=True)
    (store.images.folder / "a.png").write_bytes(b"png")
    read_by_running = store.create_file("batch", "running.jsonl", b'{"custom_id": "r"}\n', 19)
    old_input = store.create_file("batch", "done.jsonl", b'{"custom_id": "a"}\n', 19)
    output = store.create_file("batch_output", "out.jsonl", b"{}\n", 3)
    done = new_batch(store, session_id, ["a"])
    running = new_batch(store, session_id, ["r"])
    with store.engine.begin() as db:
        db.execute(Batch.__table__.update().where(Batch.id == running.id).values(input_file_id=read_by_running.id))
    [line] = lines_of(store, done.id)
    store.claim("r1", lease_s=30, max_attempts=3)
    store.start_processes([line.id], holder="r1")
    store.finish_process(line.id, [("a.png", "Image")], holder="r1")
    store.take_batch_to_finalize(done.id, "r1", 60)
    store.end_batch(done.id, "r1", output.id, None)
    cutoff = utcnow() + timedelta(seconds=1)

    assert store.remove_ended_before(cutoff) == 0, "a batch's lines go with their batch, not before"
    assert store.remove_batches_ended_before(cutoff) == 1
    with pytest.raises(BatchNotFound):
        store.get_batch(done.id)
    assert not (store.images.folder / "a.png").exists() and lines_of(store, done.id) == []
    for gone in (output.id, old_input.id):
        with pytest.raises(FileNotFound):
            store.read_file(gone)
    assert store.read_file(read_by_running.id) == b'{"custom_id": "r"}\n', "a running batch still reads it"
    assert store.get_batch(running.id).status == "in_progress"
