"""Nothing accepted fails by timeout: the cost limit, the stored queue and 429 with a computed Retry-After.

The server here allows 8 s of queue latency (a budget of 0.8 x 8 = 6.4 s of
estimated work at the model) and a 10 s request timeout. Its stored cost
figure makes the largest allowed generation, 256x256 at 21 steps, worth 6.19 s:
one at a time fits. The tiny test model really takes about 1 s for one (8 s for
a batch of 8), so sixteen of them handed to the model at once would end by
timeout; queued, each call finishes long before it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.gate import wait_until_queued_at_model
from tests.test_service import TASK, batch_size_totals, wait_until_ended

COST = {"overhead_s": 0.0, "seconds_per_megapixel_step": 4.5}
LARGEST = {"width": 256, "height": 256, "num_inference_steps": 21}


@pytest.fixture(scope="module")
def server_config():
    return {"model": {"cost": COST}, "serving": {"request_timeout_s": 10}, "batching": {"max_latency_ms": 8000},
            "limits": {"max_width": 256, "max_height": 256, "max_steps": 50}}


def test_a_request_above_the_cost_limit_is_refused_naming_the_largest_size_and_steps(http):
    too_long = {"width": 256, "height": 256, "num_inference_steps": 40}
    session = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "too long",
                                                             "parameters": too_long})
    assert session.status_code == 422
    assert session.json() == {
        "field": "width",
        "detail": "256x256 at 40 steps (1 image) would take about 12 s on this server, more than the 6.4 s a "
                  "generation may take: at 40 steps and 1 image the largest size is 184x184; at 256x256 and 1 image "
                  "the most steps is 21.",
    }
    # OpenAI clients get the same sentence in OpenAI's shape, about the parameter they sent.
    answer = http.post("/v1/images/generations", json={"prompt": "p", "size": "256x256", "num_inference_steps": 40})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "size" and "the most steps is 21" in answer.json()["error"]["message"]
    # The limit is published where clients build their forms.
    [model] = http.get("/api/v1/component/", params={"related_component": TASK}).json()
    assert "must finish within 6.4 s here" in model["schema"]["properties"]["width"]["description"]


def test_sixteen_processes_at_the_largest_allowed_size_all_finish(http):
    session = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "largest",
                                                             "parameters": LARGEST})
    assert session.status_code == 201, session.text
    before = batch_size_totals(http)
    ids = []
    for i in range(16):
        created = http.post("/api/v1/generative-process/", json={"session_id": session.json()["id"],
                                                                 "input": [f"a red circle {i}"]})
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])

    ended = [wait_until_ended(http, process_id) for process_id in ids]
    assert [p["status"] for p in ended] == [3] * 16, [p["output"] for p in ended if p["status"] != 3]
    # The queue handed them over one at a time: each alone fills the model's budget.
    after = batch_size_totals(http)
    assert (after[0] - before[0], after[1] - before[1]) == (16, 16)


def test_a_live_requests_retry_after_grows_with_the_work_ahead_of_it(server, gate, http):
    def generate(size: str, steps: int = 21) -> httpx.Response:
        return http.post("/v1/images/generations", json={
            "prompt": "a blue square", "size": size, "num_inference_steps": steps, "response_format": "b64_json"})

    retry_afters = []
    with ThreadPoolExecutor(4) as pool, gate.closed():
        # Each 128x128 request is 1.55 s of estimated work; the probe, 256x256, is 6.19 s.
        held = []
        for ahead in range(1, 4):
            held.append(pool.submit(generate, "128x128"))
            wait_until_queued_at_model(server.url, ahead)
            probe = generate("256x256")
            assert probe.status_code == 429, probe.text
            assert "of work is ahead of this request" in probe.json()["error"]["message"]
            retry_afters.append(int(probe.headers["retry-after"]))
        # A small request still fits beside the held work, so it is admitted, not refused.
        small = pool.submit(generate, "32x32", 1)
        wait_until_queued_at_model(server.url, 4)
    assert retry_afters == [2, 3, 5]
    assert [answer.result().status_code for answer in (*held, small)] == [200] * 4
