"""Job control through the real server: progress while a process runs; cancel (a queued process
never starts, a running one stops at its next step and writes no image, an ended one is 409)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.gate import wait_for
from tests.test_service import TASK, wait_until_ended

LONG = 400  # steps: seconds on this CPU, long enough to watch

# Each generation is estimated at 4 s of a 6.4 s budget: one at a time reaches the model.
ONE_AT_A_TIME = {"overhead_s": 4.0, "seconds_per_megapixel_step": 0.001}


@pytest.fixture(scope="module")
def server_config():
    return {"model": {"cost": ONE_AT_A_TIME}, "limits": {"max_steps": LONG},
            "serving": {"request_timeout_s": 60}, "batching": {"max_latency_ms": 8000}}


def submit(http, session_id: int, prompt: str) -> dict:
    created = http.post("/api/v1/generative-process/", json={"session_id": session_id, "input": [prompt]})
    assert created.status_code == 201, created.text
    return created.json()


def session(http, name: str, **parameters) -> int:
    created = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": name,
                                                             "parameters": {"width": 64, "height": 64} | parameters})
    assert created.status_code == 201, created.text
    return created.json()["id"]


def steps_run(server_folder, prompt: str) -> list[int]:
    log = server_folder / "gate.steps"
    lines = log.read_text().splitlines() if log.exists() else []
    return [int(steps) for first, steps in (line.split("\t") for line in lines) if first == prompt]


def test_a_queued_process_cancelled_never_starts(http, gate):
    sid = session(http, "queued", num_inference_steps=2)
    with gate.closed():
        running = submit(http, sid, "running")
        gate.wait_until_held()
        queued = submit(http, sid, "queued")
        assert http.get(f"/api/v1/generative-process/{queued['id']}").json()["status"] == 1

        cancelled = http.post(f"/api/v1/generative-process/{queued['id']}/cancel")
        assert cancelled.status_code == 202
        body = cancelled.json()
        assert body["status"] == 4 and body["start_time"] is None
        assert [row["data"] for row in body["output"]] == ["Error details: cancelled"]
    assert wait_until_ended(http, running["id"])["status"] == 3
    again = http.post(f"/api/v1/generative-process/{queued['id']}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    assert http.post(f"/api/v1/generative-process/{running['id']}/cancel").status_code == 409


def test_a_running_process_cancelled_stops_at_its_next_step_and_writes_no_image(http, gate, server_folder):
    sid = session(http, "running", num_inference_steps=50)
    images_before = set((server_folder / "images").glob("*.png"))
    with gate.closed():
        running = submit(http, sid, "a long one")
        gate.wait_until_held()  # in the pipeline call, about to run 50 steps
        assert http.get(f"/api/v1/generative-process/{running['id']}").json()["status"] == 2
        cancelled = http.post(f"/api/v1/generative-process/{running['id']}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] == 4 and cancelled.json()["start_time"] is not None
    [steps] = wait_for(lambda: steps_run(server_folder, "a long one"), what="the cancelled call to return")
    assert steps <= 2, f"the cancelled call ran {steps} of 50 steps"
    ended = http.get(f"/api/v1/generative-process/{running['id']}").json()
    assert [row["data"] for row in ended["output"]] == ["Error details: cancelled"]
    assert set((server_folder / "images").glob("*.png")) == images_before
    # The model is free again.
    after = submit(http, session(http, "after", num_inference_steps=2), "after the cancel")
    assert wait_until_ended(http, after["id"])["status"] == 3


def test_deleting_a_queued_process_cancels_it_first(http, gate):
    sid = session(http, "deleted", num_inference_steps=2)
    with gate.closed():
        running = submit(http, sid, "kept")
        gate.wait_until_held()
        doomed = submit(http, sid, "deleted")
        assert http.delete(f"/api/v1/generative-process/{doomed['id']}").status_code == 204
    assert wait_until_ended(http, running["id"])["status"] == 3
    assert http.get(f"/api/v1/generative-process/{doomed['id']}").status_code == 404
    assert [p["id"] for p in http.get(f"/api/v1/generative-process/session/{sid}").json()] == [running["id"]]


def test_cancelling_an_unknown_process_is_404(http):
    assert http.post("/api/v1/generative-process/999999/cancel").status_code == 404


def test_progress_grows_while_a_process_runs_and_ends_at_its_total(http):
    process = submit(http, session(http, "progress", num_inference_steps=LONG), "watched")
    assert process["progress"] == {"step": 0, "total": LONG}
    seen, job_lines = [], set()

    def ended():
        current = http.get(f"/api/v1/generative-process/{process['id']}").json()
        if current["status"] == 2 and 0 < current["progress"]["step"] < LONG:
            seen.append(current["progress"]["step"])
            job_lines.add(http.get(f"/api/v1/job/{process['id']}").json()["progress_message"])
        return current if current["status"] in (3, 4) else None

    final = wait_for(ended, interval=0.2, what="the watched process to end")
    assert final["status"] == 3 and final["progress"] == {"step": LONG, "total": LONG}
    assert len(set(seen)) >= 2 and seen == sorted(seen), f"progress seen while running: {seen}"
    assert any(line and line.startswith("step ") and line.endswith(f"/{LONG}") for line in job_lines), job_lines
    listed = http.get(f"/api/v1/generative-process/session/{final['session_id']}").json()
    assert listed[0]["progress"] == {"step": LONG, "total": LONG}


def events(http, process_id: int) -> list[dict]:
    """Every event of a process's stream, until the server closes it."""
    received = []
    with http.stream("GET", f"/api/v1/generative-process/{process_id}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                received.append(json.loads(line.removeprefix("data:").strip()))
    return received


def test_the_event_stream_follows_a_process_and_closes_on_its_final_status(http):
    process = submit(http, session(http, "streamed", num_inference_steps=LONG), "streamed")
    received = events(http, process["id"])
    assert received[-1] == {"id": process["id"], "status": 3, "progress": {"step": LONG, "total": LONG}}
    assert all(event["status"] in (1, 2) for event in received[:-1])
    steps = [event["progress"]["step"] for event in received]
    assert steps == sorted(steps) and len(set(steps)) >= 3, steps  # 0, some running steps, the total
    # Ended already: one final event, and the stream closes.
    assert events(http, process["id"]) == [received[-1]]
    assert http.get("/api/v1/generative-process/999999/events").status_code == 404


def test_a_live_call_whose_client_leaves_is_cancelled_and_its_call_stopped(server, http, gate, server_folder):
    prompt = "nobody waits for this"
    with gate.closed():
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its call is held in the pipeline
            httpx.post(f"{server.url}/v1/images/generations", timeout=httpx.Timeout(60, read=3), json={
                "prompt": prompt, "size": "64x64", "num_inference_steps": LONG, "response_format": "b64_json"})

        def cancelled():
            [openai] = [s for s in http.get("/api/v1/generative-session/").json() if s["name"].startswith("openai-")]
            processes = http.get(f"/api/v1/generative-process/session/{openai['id']}").json()
            [process] = [p for p in processes if p["input"][0]["data"] == prompt]
            return process if process["status"] == 4 else None

        process = wait_for(cancelled, what="the left call's process to be cancelled")
        assert [row["data"] for row in process["output"]] == ["Error details: cancelled"]
    [steps] = wait_for(lambda: steps_run(server_folder, prompt), what="the left call to return")
    assert steps <= 2, f"the left call ran {steps} of {LONG} steps"
