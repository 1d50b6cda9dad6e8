"""Replicas on one PostgreSQL take over each other's work: a replica killed, stopped, or hung.

Real servers (`bentoml serve`), real signals; the gate (tests/gate.py) holds each replica's
generations where a test wants them. Leases are short here (2 s) so that takeovers happen in
test time; the default is 30 s.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from t2i_task.local_server import Server, start_server, write_config
from tests.gate import Gate, wait_for
from tests.test_reliability import all_ended, create_processes, create_session, statuses

IMAGES_PER_PROCESS = 1


def gate_in(folder: Path, name: str) -> Gate:
    (folder / name).mkdir(exist_ok=True)
    return Gate(folder / name)


def replica(config: Path, gate: Gate, postgres_url: str, name: str) -> Server:
    return start_server(config, env=gate.env(T2I_DATABASE_URL=postgres_url, T2I_INSTANCE_NAME=name),
                        log_name=f"{name}.log")


def stored(postgres_url: str, ids: list[int]) -> dict[int, tuple[str, str, int]]:
    """(status, owner, attempts) of each process, as the database has them."""
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as db:
            rows = db.execute(text("SELECT id, status, owner, attempts FROM generative_process WHERE id = ANY(:ids)"),
                              {"ids": ids})
            return {row.id: (row.status, row.owner, row.attempts) for row in rows}
    finally:
        engine.dispose()


def outputs(http: httpx.Client, ids: list[int]) -> list[str]:
    return [row["data"] for i in ids for row in http.get(f"/api/v1/generative-process/{i}").json()["output"]]


def assert_one_result_each(http: httpx.Client, ids: list[int], folder: Path) -> None:
    names = outputs(http, ids)
    assert len(names) == len(ids) * IMAGES_PER_PROCESS and len(set(names)) == len(names), "one result per process"
    assert {p.name for p in (folder / "images").glob("*")} == set(names), "no orphan image, none missing"


def signal_all(server: Server, signum: int) -> None:
    """A signal to the server and every worker (as a hung machine or a debugger stops them all)."""
    for process in server._processes():
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def test_a_killed_replicas_queued_and_running_work_is_finished_by_the_other(tiny_model_path, folder, postgres_url):
    config = write_config(folder, tiny_model_path, serving={"lease_s": 2})
    gate_a, gate_b = gate_in(folder, "a"), gate_in(folder, "b")
    a = replica(config, gate_a, postgres_url, "replica-a")
    b = replica(config, gate_b, postgres_url, "replica-b")
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            ids = create_processes(http, create_session(http, "takeover"), 6)
            gate_a.wait_until_held()
            assert 2 in statuses(http, ids), "one call is running when the replica dies"
        a.kill()  # SIGKILL to every process: nothing is released, the leases expire
        killed = time.monotonic()

        with httpx.Client(base_url=b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, ids), timeout=120) == [3] * 6
            took_s = time.monotonic() - killed
            assert_one_result_each(http, ids, folder)
        rows = stored(postgres_url, ids)
        assert {owner for _, owner, _ in rows.values()} == {"replica-b"}
        print(f"replica-b finished the 6 processes of the killed replica-a {took_s:.1f} s after the kill (lease 2 s)")
    finally:
        a.kill()
        b.stop()


def test_a_replica_stopped_with_sigterm_releases_its_work_at_once(tiny_model_path, folder, postgres_url):
    # A lease far longer than the test: only the release lets the other replica take the work.
    config = write_config(folder, tiny_model_path, serving={"lease_s": 600, "drain_timeout_s": 1})
    gate_a, gate_b = gate_in(folder, "a"), gate_in(folder, "b")
    a = replica(config, gate_a, postgres_url, "replica-a")
    b = replica(config, gate_b, postgres_url, "replica-b")
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            ids = create_processes(http, create_session(http, "rolling-update"), 4)
            gate_a.wait_until_held()
        a.process.send_signal(signal.SIGTERM)  # as the kubelet sends it
        wait_for(lambda: "drained: 0 finished" in a.log.read_text(), what="the drain releasing the running call")
        gate_a.open()  # the model worker's held call ends; nothing of it is stored
        assert a.stop(timeout=60) == 0
        rows = stored(postgres_url, ids)
        assert {status for status, _, _ in rows.values()} == {"DELIVERED"}, rows
        assert {owner for _, owner, _ in rows.values()} == {None}, "owned by nobody: any replica takes them"

        with httpx.Client(base_url=b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, ids), timeout=120) == [3] * 4
            assert_one_result_each(http, ids, folder)
    finally:
        a.kill()
        b.stop()


def test_a_replica_that_hung_past_its_lease_stores_nothing_when_it_wakes(tiny_model_path, folder, postgres_url):
    config = write_config(folder, tiny_model_path, serving={"lease_s": 2})
    gate_a, gate_b = gate_in(folder, "a"), gate_in(folder, "b")
    a = replica(config, gate_a, postgres_url, "replica-a")
    b = replica(config, gate_b, postgres_url, "replica-b")
    try:
        gate_a.close()
        with httpx.Client(base_url=a.url, timeout=60) as http:
            [process_id] = create_processes(http, create_session(http, "hung"), 1)
            gate_a.wait_until_held()
        signal_all(a, signal.SIGSTOP)  # hung: no renewals, and its generation waits mid-call
        with httpx.Client(base_url=b.url, timeout=60) as http:
            assert wait_for(lambda: all_ended(http, [process_id]), timeout=120) == [3], "taken over and finished"
            finished_by_b = outputs(http, [process_id])

            gate_a.open()
            signal_all(a, signal.SIGCONT)  # a wakes, its generation finishes: the process is no longer its own
            wait_for(lambda: "taken over elsewhere" in a.log.read_text(), what="replica-a letting the process go")
            assert outputs(http, [process_id]) == finished_by_b, "b's result stays the only one"
            assert_one_result_each(http, [process_id], folder)
            assert http.get(f"/api/v1/generative-process/{process_id}").json()["status"] == 3
        assert os.path.exists(a.log) and a.process.poll() is None, "replica-a carries on"
    finally:
        signal_all(a, signal.SIGCONT)
        a.kill()
        b.stop()
