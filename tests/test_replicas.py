"""Replicas on one PostgreSQL take over each other's work: a replica killed, stopped, or hung.

Real servers (`bentoml serve`), real signals; the gate (tests/gate.py) holds each replica's
generations where a test wants them. Leases are short here (2 s) so that takeovers happen in
test time; the default is 30 s.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from t2i_task.local_server import Server, start_server, write_config
from tests.conftest import postgres_schema
from tests.gate import Gate, wait_for
from tests.test_reliability import all_ended, create_processes, create_session, statuses

IMAGES_PER_PROCESS = 1


@dataclass
class Cluster:
    """Replica B, up for the whole module, and what replica A of each test shares with it."""

    folder: Path
    database_url: str
    model_path: Path
    b: Server
    gate_b: Gate

    def start_a(self, name: str, **serving) -> tuple[Server, Gate]:
        """Replica A, with its own gate and `serving` settings; its work held by the gate once it is closed."""
        folder = self.folder / name
        folder.mkdir()
        gate = Gate(folder)
        config = write_config(folder, self.model_path, serving=serving)
        env = gate.env(T2I_DATABASE_URL=self.database_url, T2I_INSTANCE_NAME=name,
                       T2I_IMAGES_DIR=str(self.folder / "images"))
        return start_server(config, env=env, log_name=f"{name}.log"), gate

    def stored(self) -> dict[int, tuple[str, str, int]]:
        """(status, owner, attempts) of every process, as the database has them."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as db:
                rows = db.execute(text("SELECT id, status, owner, attempts FROM generative_process"))
                return {row.id: (row.status, row.owner, row.attempts) for row in rows}
        finally:
            engine.dispose()

    def assert_one_result_each(self, http: httpx.Client, ids: list[int]) -> None:
        names = outputs(http, ids)
        assert len(names) == len(ids) * IMAGES_PER_PROCESS and len(set(names)) == len(names), "one result each"
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as db:
                named = set(db.execute(text("SELECT data FROM process_data WHERE data_type = 'Image'")).scalars())
        finally:
            engine.dispose()
        assert {p.name for p in (self.folder / "images").glob("*")} == named, "no orphan image, none missing"


@pytest.fixture(scope="module")
def cluster(tiny_model_path, tmp_path_factory, postgres_admin_engine) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("replicas")
    (folder / "b").mkdir()
    gate_b = Gate(folder / "b")
    # B's lease settings matter little: a process's lease is its holder's. B sweeps every second.
    config = write_config(folder / "b", tiny_model_path, serving={"lease_s": 2})
    with postgres_schema(postgres_admin_engine) as url:
        b = start_server(config, env=gate_b.env(T2I_DATABASE_URL=url, T2I_INSTANCE_NAME="replica-b",
                                                T2I_IMAGES_DIR=str(folder / "images")), log_name="replica-b.log")
        try:
            yield Cluster(folder, url, tiny_model_path, b, gate_b)
        finally:
            b.stop()


def outputs(http: httpx.Client, ids: list[int]) -> list[str]:
    return [row["data"] for i in ids for row in http.get(f"/api/v1/generative-process/{i}").json()["output"]]


def stored_work_waiting(server: Server) -> dict[str, int]:
    """The autoscaling gauge, by priority, from the server's /metrics."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {priority: int(float(value)) for priority, value in
            re.findall(r'^t2i_stored_work_waiting{priority="(\w+)"} (\S+)$', metrics, re.MULTILINE)}


def signal_all(server: Server, signum: int) -> None:
    """A signal to the server and every worker (as a hung machine or a debugger stops them all)."""
    for process in server._processes():
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def test_a_killed_replicas_queued_and_running_work_is_finished_by_the_other(cluster):
    a, gate_a = cluster.start_a("replica-a1", lease_s=2)
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            ids = create_processes(http, create_session(http, "takeover"), 6)
            gate_a.wait_until_held()
            assert 2 in statuses(http, ids), "one call is running when the replica dies"
        # What waits is counted from the database, so replica-b reports replica-a's waiting work.
        waiting = sum(cluster.stored()[i][0] == "DELIVERED" for i in ids)
        assert waiting > 0
        wait_for(lambda: stored_work_waiting(cluster.b) == {"live": 0, "queued": waiting}, timeout=30,
                 what=f"replica-b's gauge at {waiting} queued")
        a.kill()  # SIGKILL to every process: nothing is released, the leases expire
        killed = time.monotonic()

        with httpx.Client(base_url=cluster.b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, ids), timeout=120) == [3] * 6
            took_s = time.monotonic() - killed
            cluster.assert_one_result_each(http, ids)
        stored = cluster.stored()
        assert {stored[i][1] for i in ids} == {"replica-b"}
        print(f"replica-b finished the 6 processes of the killed replica-a {took_s:.1f} s after the kill (lease 2 s)")
    finally:
        a.kill()


def test_a_replica_stopped_with_sigterm_releases_its_work_at_once(cluster):
    # A lease far longer than the test: only the release lets the other replica take the work.
    a, gate_a = cluster.start_a("replica-a2", lease_s=600, drain_timeout_s=1)
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            ids = create_processes(http, create_session(http, "rolling-update"), 4)
            gate_a.wait_until_held()
        a.process.send_signal(signal.SIGTERM)  # as the kubelet sends it
        wait_for(lambda: "drained: 0 finished" in a.log.read_text(), what="the drain releasing the running call")
        gate_a.open()  # the model worker's held call ends; nothing of it is stored
        assert a.stop(timeout=60) == 0
        stored = cluster.stored()
        assert {stored[i][0] for i in ids} <= {"DELIVERED", "STARTED", "FINISHED"}, stored
        with httpx.Client(base_url=cluster.b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, ids), timeout=120) == [3] * 4
            cluster.assert_one_result_each(http, ids)
        stored = cluster.stored()
        assert {stored[i][1] for i in ids} == {"replica-b"}, "released, and taken by B long before A's lease ends"
    finally:
        a.kill()


def test_a_replica_that_hung_past_its_lease_stores_nothing_when_it_wakes(cluster):
    a, gate_a = cluster.start_a("replica-a3", lease_s=2)
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            [process_id] = create_processes(http, create_session(http, "hung"), 1)
            gate_a.wait_until_held()
        signal_all(a, signal.SIGSTOP)  # hung: no renewals, and its generation waits mid-call
        with httpx.Client(base_url=cluster.b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, [process_id]), timeout=120) == [3], "taken over and finished"
            finished_by_b = outputs(http, [process_id])

            gate_a.open()
            signal_all(a, signal.SIGCONT)  # a wakes, its generation finishes: the process is no longer its own
            wait_for(lambda: "taken over elsewhere" in a.log.read_text(), what="replica-a letting the process go")
            assert outputs(http, [process_id]) == finished_by_b, "b's result stays the only one"
            cluster.assert_one_result_each(http, [process_id])
            assert http.get(f"/api/v1/generative-process/{process_id}").json()["status"] == 3
        assert a.process.poll() is None, "replica-a carries on"
    finally:
        signal_all(a, signal.SIGCONT)
        a.kill()


def test_progress_and_cancel_work_through_a_replica_that_does_not_run_the_process(cluster):
    a, gate_a = cluster.start_a("replica-a4", lease_s=2)
    try:
        with gate_a.holding_after_step(3) as reached, httpx.Client(base_url=a.url, timeout=60) as on_a, \
                httpx.Client(base_url=cluster.b.url, timeout=60) as on_b:
            [process_id] = create_processes(on_a, create_session(on_a, "cancel-elsewhere", num_inference_steps=20), 1)
            wait_for(reached, what="the call on replica-a part-way through")
            # replica-a writes its progress to the database every second; replica-b reads it there.
            wait_for(lambda: on_b.get(f"/api/v1/generative-process/{process_id}").json()["progress"] ==
                     {"step": 3, "total": 20}, timeout=30, what="progress seen through replica-b")

            cancelled = on_b.post(f"/api/v1/generative-process/{process_id}/cancel")
            assert cancelled.status_code == 202 and cancelled.json()["status"] == 4
            wait_for(lambda: "taken over elsewhere" in a.log.read_text(), what="replica-a stopping the process")
        # The hold ends with the block: replica-a's call stops at its next step.
        steps_log = gate_a.path.with_name("gate.steps")
        ran = wait_for(lambda: steps_log.exists() and steps_log.read_text().split(), what="the call's end")
        assert int(ran[-1]) < 20, "the call stopped early"
        with httpx.Client(base_url=cluster.b.url, timeout=60) as on_b:
            process = on_b.get(f"/api/v1/generative-process/{process_id}").json()
            assert process["status"] == 4 and [row["data"] for row in process["output"]] == ["Error details: cancelled"]
            cluster.assert_one_result_each(on_b, [])  # and no image anywhere
    finally:
        a.kill()


def test_a_batchs_lines_are_shared_by_the_replicas_and_its_results_written_once(cluster):
    """Forty lines created through B: B takes what its model has room for (32), A, started after,
    takes the rest; both run theirs and one of them writes every custom_id once."""
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/images/generations",
                                "body": {"prompt": f"shared {i}", "num_inference_steps": 2}}) + "\n" for i in range(40))
    with httpx.Client(base_url=cluster.b.url, timeout=60) as on_b:
        cluster.gate_b.close()
        try:
            upload = on_b.post("/v1/files", files={"file": ("lines.jsonl", lines.encode())}, data={"purpose": "batch"})
            batch = on_b.post("/v1/batches", json={"input_file_id": upload.json()["id"], "completion_window": "24h",
                                                   "endpoint": "/v1/images/generations"}).json()
            cluster.gate_b.wait_until_held()
            a, _ = cluster.start_a("replica-a5", lease_s=2)
            # A takes what B had no room for once its model answers (its queue starts then).
            wait_for(lambda: "replica-a5" in batch_line_owners(cluster, batch["id"]), timeout=60,
                     what="replica-a5 holding lines of the batch")
        finally:
            cluster.gate_b.open()
        try:
            done = wait_for(lambda: (b := on_b.get(f"/v1/batches/{batch['id']}").json())["status"] == "completed" and b,
                            timeout=120, what="the batch completed")
            output = [json.loads(line)["custom_id"] for line in
                      on_b.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()]
            assert output == [f"line-{i}" for i in range(40)] and done["request_counts"]["completed"] == 40
        finally:
            a.stop()
    assert batch_line_owners(cluster, batch["id"]) == {"replica-b", "replica-a5"}


def batch_line_owners(cluster: Cluster, batch_id: str) -> set[str]:
    engine = create_engine(cluster.database_url)
    try:
        with engine.connect() as db:
            return set(db.execute(text("SELECT owner FROM generative_process WHERE batch_id = :batch"),
                                  {"batch": batch_id}).scalars())
    finally:
        engine.dispose()
