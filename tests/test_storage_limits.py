"""Bounded storage: old work is forgotten (`storage.retention`), and a low disk refuses new work (507)."""

from __future__ import annotations

import httpx
import pytest

from t2i_task.local_server import start_server, write_config
from tests.gate import wait_for
from tests.test_service import TASK, wait_until_ended

RETENTION_S = 3


@pytest.fixture(scope="module")
def kept_briefly(tiny_model_path, tmp_path_factory):
    """A server that keeps ended work RETENTION_S seconds."""
    folder = tmp_path_factory.mktemp("retention")
    server = start_server(write_config(folder, tiny_model_path), env={"T2I_RETENTION": f"{RETENTION_S}s"})
    yield server
    server.stop()


def test_ended_processes_past_the_retention_go_with_their_images_and_sessions_stay(kept_briefly):
    images = kept_briefly.config.parent / "images"
    with httpx.Client(base_url=kept_briefly.url, timeout=120) as http:
        session = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "brief",
                                                                 "parameters": {"width": 64, "height": 64}}).json()
        process = http.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["a cat"]})
        ended = wait_until_ended(http, process.json()["id"])
        [image] = ended["output"]
        assert (images / image["data"]).exists()
        wait_for(lambda: http.get(f"/api/v1/generative-process/{ended['id']}").status_code == 404,
                 timeout=RETENTION_S * 10, what="the ended process to be forgotten")
        assert not (images / image["data"]).exists()
        assert http.get(f"/api/v1/generative-session/{session['id']}").status_code == 200
        assert http.get(f"/api/v1/generative-process/session/{session['id']}").json() == []


def test_a_low_disk_refuses_new_work_everywhere_with_507_and_reads_still_work(kept_briefly):
    """A second server on the same database, with a free-space threshold no disk meets."""
    low = start_server(kept_briefly.config, env={"T2I_MIN_FREE_MB": str(10**12)}, log_name="low-disk.log")
    try:
        with httpx.Client(base_url=low.url, timeout=120) as http:
            session = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "low disk"})
            assert session.status_code == 201  # a session is a row, not an image
            attempts = [
                http.post("/api/v1/generative-process/", json={"session_id": session.json()["id"], "input": ["x"]}),
                http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}),
                http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "stream": True}),
            ]
            for refused in attempts:
                assert refused.status_code == 507, refused.text
                assert "storage.min_free_mb" in refused.text and "MB free" in refused.text
            assert http.get("/api/v1/generative-session/").status_code == 200
            assert http.get("/v1/models").status_code == 200
            assert http.get(f"/api/v1/generative-process/session/{session.json()['id']}").json() == []
    finally:
        low.stop()
