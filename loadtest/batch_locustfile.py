"""Load test through bulk jobs: users who each upload a batch of prompts (OpenAI's Batch API),
wait for it and download its results, against any server.

    make loadtest-batch URL=http://127.0.0.1:3000 USERS=2 LINES=200 TIME=5m
    .venv/bin/locust -f loadtest/batch_locustfile.py --headless --host http://127.0.0.1:3000 -u 2 -r 2 -t 5m

Settings through the environment: T2I_LOAD_LINES (requests a batch, default 100), and
loadtest/locustfile.py's T2I_LOAD_SIZE and T2I_LOAD_STEPS. Besides the HTTP calls, each batch
is reported as one request named `batch [<lines> lines]`, its time from upload to results in
hand: Locust's summary then shows batches per second and their duration. Run it beside
loadtest/locustfile.py (another terminal) to see live users' latency with batches running.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

from locustfile import SIZE, STEPS, check, random_prompt, random_seed

LINES = int(os.environ.get("T2I_LOAD_LINES", "100"))
POLL_S = 1.0
ENDED = ("completed", "failed", "cancelled", "expired")


class BatchUser(HttpUser):
    """Uploads a batch, polls it until it ends, downloads its output and error files."""

    wait_time = between(1, 3)

    @task
    def run_batch(self) -> None:
        started = time.perf_counter()
        lines = "".join(json.dumps({"custom_id": f"{i}", "method": "POST", "url": "/v1/images/generations", "body": {
            "prompt": random_prompt(), "size": SIZE, "num_inference_steps": STEPS, "seed": random_seed(),
            "n": random.choice([1, 1, 1, 2])}}) + "\n" for i in range(LINES))
        with self.client.post("/v1/files", files={"file": ("load.jsonl", lines.encode())}, data={"purpose": "batch"},
                              catch_response=True, name="/v1/files") as response:
            if not check(response):
                return
            file_id = response.json()["id"]
        with self.client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations",
                                                   "completion_window": "24h"},
                              catch_response=True, name="/v1/batches") as response:
            if not check(response):
                return
            batch = response.json()
        while batch["status"] not in ENDED:
            time.sleep(POLL_S)
            batch = self.client.get(f"/v1/batches/{batch['id']}", name="/v1/batches/{id}").json()
        for file_id in (batch["output_file_id"], batch["error_file_id"]):
            if file_id:
                self.client.get(f"/v1/files/{file_id}/content", name="/v1/files/{id}/content")
        counts = batch["request_counts"]
        failed = batch["status"] != "completed" or counts["completed"] != counts["total"]
        self.environment.events.request.fire(
            request_type="BATCH", name=f"batch [{LINES} lines]", response_time=(time.perf_counter() - started) * 1000,
            response_length=counts["completed"], context={},
            exception=RuntimeError(f"batch {batch['status']}: {counts}") if failed else None)
