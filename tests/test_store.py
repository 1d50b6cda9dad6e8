"""The store on SQLite and on PostgreSQL: the same tests for both."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from t2i_task.storage.store import (
    DuplicateSessionName,
    InvalidTransition,
    ProcessNotFound,
    SessionNotFound,
    Store,
)
from t2i_task.storage.tables import GenerativeProcess, ProcessData, RunStatus

TASK = "TextToImageGenerationTask"


def new_session(store: Store, name: str = "s1", **parameters):
    return store.create_session(task_name=TASK, model_name="tiny-sd", name=name, parameters=parameters or {"seed": 1})


def count(store: Store, model) -> int:
    with store.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(model))


def test_a_new_session_is_readable_and_starts_its_parameter_history(store):
    created = store.create_session(
        task_name=TASK, model_name="tiny-sd", name="cats", parameters={"width": 64}, description="d"
    )
    loaded = store.get_session(created.id)

    assert (loaded.task_name, loaded.model_name, loaded.name, loaded.description) == (TASK, "tiny-sd", "cats", "d")
    assert loaded.parameters == {"width": 64}
    assert loaded.created.tzinfo is not None
    assert [h.parameters for h in store.get_parameter_history(created.id)] == [{"width": 64}]


def test_session_names_are_unique(store):
    new_session(store, "same")
    with pytest.raises(DuplicateSessionName, match="'same' already exists"):
        new_session(store, "same")
    assert len(store.list_sessions()) == 1


def test_each_parameter_update_is_recorded_in_order(store):
    session = new_session(store, seed=1)
    store.update_session_parameters(session.id, {"seed": 2})
    updated = store.update_session_parameters(session.id, {"seed": 3, "width": 128})

    assert updated.parameters == {"seed": 3, "width": 128}
    assert store.get_session(session.id).parameters == {"seed": 3, "width": 128}
    assert [h.parameters for h in store.get_parameter_history(session.id)] == [
        {"seed": 1},
        {"seed": 2},
        {"seed": 3, "width": 128},
    ]


def test_unknown_sessions_are_reported_with_dashai_message(store):
    for call in (
        lambda: store.get_session(404),
        lambda: store.update_session_parameters(404, {}),
        lambda: store.create_process(404, [("a cat", "str")]),
        lambda: store.list_processes(404),
    ):
        with pytest.raises(SessionNotFound, match=r"^Session with ID 404 does not exist\.$"):
            call()
    assert count(store, GenerativeProcess) == 0 and count(store, ProcessData) == 0


def test_a_new_process_is_delivered_with_its_input_rows(store):
    session = new_session(store)
    process = store.create_process(session.id, [("a cat", "str")])
    loaded = store.get_process(process.id)

    assert loaded.status is RunStatus.DELIVERED
    assert loaded.delivery_time is not None and loaded.start_time is None and loaded.end_time is None
    assert [(row.data, row.data_type, row.is_input) for row in loaded.input] == [("a cat", "str", True)]
    assert loaded.output == []


def test_a_process_stored_started_counts_its_first_attempt_and_what_it_returns_matches_the_row(store):
    runs_with = {"model": "shapes-64", "num_inference_steps": 4, "seed": 7}
    process = store.create_process(new_session(store).id, [("a cat", "str"), ("a dog", "str")],
                                   status=RunStatus.STARTED, owner="a", parameters=runs_with)
    loaded = store.get_process(process.id)
    for seen in (process, loaded):
        assert seen.status is RunStatus.STARTED and seen.attempts == 1 and seen.owner == "a"
        assert seen.start_time is not None and (seen.progress_step, seen.progress_total) == (0, 4)
        assert seen.parameters == runs_with
    assert [(row.id, row.data) for row in process.input] == [(row.id, row.data) for row in loaded.input]
    store.finish_process(process.id, [("a.png", "Image")])
    assert store.get_process(process.id).progress_step == 4  # all its steps done
    with pytest.raises(ValueError):
        store.create_process(process.session_id, [("x", "str")], status=RunStatus.FINISHED)


def test_a_process_moves_through_started_to_finished_with_timestamps_and_outputs(store):
    process = store.create_process(new_session(store).id, [("a cat", "str")])
    store.start_process(process.id)
    started = store.get_process(process.id)
    assert started.status is RunStatus.STARTED and started.start_time is not None

    store.finish_process(process.id, [("a.png", "Image"), ("b.png", "Image")])
    finished = store.get_process(process.id)

    assert finished.status is RunStatus.FINISHED
    assert finished.delivery_time <= finished.start_time <= finished.end_time
    assert [(row.data, row.data_type, row.is_input) for row in finished.output] == [
        ("a.png", "Image", False),
        ("b.png", "Image", False),
    ]
    assert [row.data for row in finished.input] == ["a cat"]


def test_a_failed_process_holds_one_error_row(store):
    process = store.create_process(new_session(store).id, [("a cat", "str")])
    store.start_process(process.id)
    store.fail_process(process.id, "CUDA out of memory")

    failed = store.get_process(process.id)
    assert failed.status is RunStatus.ERROR and failed.end_time is not None
    assert [(row.data, row.data_type) for row in failed.output] == [("Error details: CUDA out of memory", "str")]


@pytest.mark.parametrize("status", [RunStatus.FINISHED, RunStatus.ERROR])
def test_an_ended_process_cannot_move_again(store, status):
    process = store.create_process(new_session(store).id, [("a cat", "str")])
    store.start_process(process.id)
    if status is RunStatus.FINISHED:
        store.finish_process(process.id, [("a.png", "Image")])
    else:
        store.fail_process(process.id, "boom")

    with pytest.raises(InvalidTransition, match=f"is {status.name}"):
        store.start_process(process.id)
    with pytest.raises(InvalidTransition):
        store.finish_process(process.id, [("b.png", "Image")])
    assert len(store.get_process(process.id).output) == 1


def test_a_queued_process_cannot_finish_without_starting(store):
    process = store.create_process(new_session(store).id, [("a cat", "str")])
    with pytest.raises(InvalidTransition, match="DELIVERED; it cannot become FINISHED"):
        store.finish_process(process.id, [("a.png", "Image")])
    assert store.get_process(process.id).output == []


def test_a_failure_inside_a_transaction_leaves_nothing_behind(store):
    session = new_session(store)
    with pytest.raises(IntegrityError):
        # The second row violates NOT NULL after the process and first row were added.
        store.create_process(session.id, [("a cat", "str"), (None, "str")])
    assert count(store, GenerativeProcess) == 0 and count(store, ProcessData) == 0


def test_processes_are_listed_per_session_in_order(store):
    first, second = new_session(store, "one"), new_session(store, "two")
    a = store.create_process(first.id, [("a", "str")])
    store.create_process(second.id, [("b", "str")])
    c = store.create_process(first.id, [("c", "str")])

    listed = store.list_processes(first.id)
    assert [p.id for p in listed] == [a.id, c.id]
    assert [p.input[0].data for p in listed] == ["a", "c"]


def test_deleting_a_process_removes_its_rows_and_image_files(store):
    session = new_session(store)
    store.images.folder.mkdir(parents=True, exist_ok=True)
    for name in ("mine.png", "other.png"):
        (store.images.folder / name).write_bytes(b"png")
    mine = store.create_process(session.id, [("a", "str")])
    other = store.create_process(session.id, [("b", "str")])
    for process, image in ((mine, "mine.png"), (other, "other.png")):
        store.start_process(process.id)
        store.finish_process(process.id, [(image, "Image")])

    store.delete_process(mine.id)

    with pytest.raises(ProcessNotFound, match=f"Process with ID {mine.id} does not exist"):
        store.get_process(mine.id)
    assert sorted(p.name for p in store.images.folder.iterdir()) == ["other.png"]
    assert [p.id for p in store.list_processes(session.id)] == [other.id]
    assert count(store, ProcessData) == 2  # only the other process's input and output
    with pytest.raises(ProcessNotFound):
        store.delete_process(mine.id)


def test_image_removal_never_leaves_the_images_folder(store, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    store.remove_images(["../outside.png", str(outside)])
    assert outside.read_bytes() == b"keep me"


def test_tables_are_created_on_start_and_data_survives_a_restart(database_url, tmp_path):
    first = Store(database_url, tmp_path)
    session_id = new_session(first).id
    first.close()

    second = Store(database_url, tmp_path)
    assert second.get_session(session_id).name == "s1"
    second.close()


def test_concurrent_writers_lose_nothing(database_url, tmp_path):
    session_id = new_session(setup := Store(database_url, tmp_path)).id
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        writer = Store(database_url, tmp_path)  # an engine of its own, as another replica would have
        try:
            for i in range(25):
                process = writer.create_process(session_id, [(f"{worker}-{i}", "str")])
                writer.start_process(process.id)
                writer.finish_process(process.id, [(f"{worker}-{i}.png", "Image")])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            writer.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    processes = setup.list_processes(session_id)
    assert len(processes) == 75 and all(p.status is RunStatus.FINISHED for p in processes)
    assert count(setup, ProcessData) == 150
    setup.close()


def test_get_or_create_session_returns_one_session_per_name(store):
    first = store.get_or_create_session(task_name=TASK, name="openai-tiny-sd", parameters={})
    second = store.get_or_create_session(task_name=TASK, name="openai-tiny-sd", parameters={"seed": 9})
    assert first.id == second.id and second.parameters == {}
    assert len(store.list_sessions()) == 1


def test_a_claim_requeues_an_owners_interrupted_work_and_gives_up_after_max_attempts(store):
    session = new_session(store)
    queued = store.create_process(session.id, [("queued", "str")], owner="a")
    running = store.create_process(session.id, [("running", "str")], owner="a")
    store.start_process(running.id)
    hopeless = store.create_process(session.id, [("hopeless", "str")], owner="a")
    for _ in range(2):
        store.start_process(hopeless.id)
        store.deliver_process(hopeless.id)  # put back, as a draining server does
    store.start_process(hopeless.id)  # third start
    other = store.create_process(session.id, [("someone else's", "str")], owner="b", lease_s=60)
    store.start_process(other.id)

    requeued, given_up = store.claim(owner="a", lease_s=30, max_attempts=3)

    assert [p.id for p in requeued] == [queued.id, running.id]
    assert [p.id for p in given_up] == [hopeless.id]
    assert store.get_process(running.id).status is RunStatus.DELIVERED
    failed = store.get_process(hopeless.id)
    assert failed.status is RunStatus.ERROR and "interrupted 3 times" in failed.output[0].data
    assert store.get_process(other.id).status is RunStatus.STARTED, "another instance's held work is left alone"


def test_orphan_images_are_removed_but_named_and_fresh_ones_kept(store):
    import os

    session = new_session(store)
    store.images.folder.mkdir(parents=True, exist_ok=True)
    for name in ("kept.png", "orphan.png", ".x.png.part", "fresh-orphan.png", "notes.txt"):
        (store.images.folder / name).write_bytes(b"x")
    old = time.time() - 3600
    for name in ("kept.png", "orphan.png", ".x.png.part", "notes.txt"):
        os.utime(store.images.folder / name, (old, old))
    process = store.create_process(session.id, [("a", "str")])
    store.start_process(process.id)
    store.finish_process(process.id, [("kept.png", "Image")])

    assert sorted(store.remove_orphan_images(older_than_s=600)) == [".x.png.part", "orphan.png"]
    assert sorted(p.name for p in store.images.folder.iterdir()) == ["fresh-orphan.png", "kept.png", "notes.txt"]


def test_a_session_is_renamed_or_switched_and_a_taken_name_refused(store):
    session, other = new_session(store, "first"), new_session(store, "second")
    renamed = store.update_session(session.id, name="renamed", model_name="other-model")
    assert (renamed.name, renamed.model_name, renamed.description) == ("renamed", "other-model", session.description)
    with pytest.raises(DuplicateSessionName):
        store.update_session(session.id, name=other.name)
    assert store.get_session(session.id).name == "renamed"


def test_deleting_sessions_removes_their_processes_and_image_files(store):
    doomed, kept = new_session(store, "doomed"), new_session(store, "kept")
    for session, name in ((doomed, "doomed.png"), (kept, "kept.png")):
        process = store.create_process(session.id, [("a", "str")])
        store.start_process(process.id)
        store.finish_process(process.id, [(name, "Image")])
    store.images.folder.mkdir(exist_ok=True)
    for name in ("doomed.png", "kept.png"):
        (store.images.folder / name).write_bytes(b"png")

    with pytest.raises(SessionNotFound):
        store.delete_sessions([doomed.id, 999])  # one missing: none deleted
    assert (store.images.folder / "doomed.png").exists()
    store.delete_sessions([doomed.id])
    assert [s.name for s in store.list_sessions()] == ["kept"]
    assert sorted(p.name for p in store.images.folder.iterdir()) == ["kept.png"]
    assert count(store, GenerativeProcess) == 1 and count(store, ProcessData) == 2


def test_progress_is_recorded_for_running_processes_only_and_a_finished_one_is_complete(store):
    session_id = new_session(store).id
    running = store.create_process(session_id, [("a", "str")], parameters={"num_inference_steps": 20})
    queued = store.create_process(session_id, [("b", "str")], parameters={"num_inference_steps": 20})
    assert (running.progress_step, running.progress_total) == (0, 20)
    store.start_process(running.id)

    store.record_progress({running.id: (7, 20), queued.id: (5, 20)})
    assert (store.get_process(running.id).progress_step, store.get_process(queued.id).progress_step) == (7, 0)

    store.finish_process(running.id, [("a.png", "Image")])
    store.record_progress({running.id: (9, 20)})  # a late report changes nothing once it has ended
    assert store.get_process(running.id).progress_step == 20


def test_retention_removes_processes_ended_before_the_cutoff_with_their_images_and_keeps_the_rest(store):
    from datetime import timedelta

    from sqlalchemy import text

    from t2i_task.storage.store import RETENTION_LOCK
    from t2i_task.storage.tables import utcnow

    session = new_session(store, "kept")
    store.images.folder.mkdir(parents=True, exist_ok=True)
    old_done, old_failed, running = (store.create_process(session.id, [(name, "str")]) for name in "abc")
    (store.images.folder / "old.png").write_bytes(b"png")
    store.start_processes([old_done.id, old_failed.id, running.id])
    store.finish_process(old_done.id, [("old.png", "Image")])
    store.fail_process(old_failed.id, "out of memory")
    cutoff = utcnow() + timedelta(seconds=1)  # both ended before it
    fresh = store.create_process(session.id, [("d", "str")])
    if store.engine.dialect.name == "postgresql":  # another replica sweeping: this one skips
        with store.engine.begin() as other:
            other.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RETENTION_LOCK})
            assert store.remove_ended_before(cutoff) == 0
    assert store.remove_ended_before(cutoff) == 2
    assert [p.id for p in store.list_processes(session.id)] == [running.id, fresh.id]
    assert not (store.images.folder / "old.png").exists() and store.get_session(session.id).name == "kept"
