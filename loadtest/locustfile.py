"""Load test: users of the OpenAI endpoint and of DashAI's process flow, against any server.

    make loadtest URL=http://127.0.0.1:3000 USERS=16 TIME=1m
    .venv/bin/locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:3000 -u 16 -r 16 -t 1m

Settings through the environment: T2I_LOAD_SIZE (default 64x64), T2I_LOAD_STEPS
(default 4). Refusals (429, 503) are reported as failures named after their
status, so the summary shows how much was turned away.
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, task

SIZE = os.environ.get("T2I_LOAD_SIZE", "64x64")
STEPS = int(os.environ.get("T2I_LOAD_STEPS", "4"))
WIDTH, HEIGHT = (int(side) for side in SIZE.split("x"))

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["", " on the left", " on the right", " at the top", " at the bottom", " in the center"]


def random_prompt() -> str:
    colour, background = random.sample(COLOURS, 2)
    size = random.choice(["", "small ", "large "])
    phrasing = random.choice([
        "a {size}{colour} {shape}{place} on a {background} background",
        "{size}{colour} {shape}{place}, {background} background",
        "a picture of a {colour} {shape} on {background}",
    ])
    return phrasing.format(size=size, colour=colour, shape=random.choice(SHAPES), place=random.choice(PLACES),
                           background=background)


def random_seed() -> int:
    # Mostly fresh seeds, sometimes a popular one again, sometimes "random" (-1).
    return random.choice([random.randrange(2**31), random.randrange(10), -1])


def check(response, expected: int = 200) -> bool:
    if response.status_code == expected:
        response.success()
        return True
    response.failure(f"HTTP {response.status_code}: {response.text[:120]}")
    return False


class OpenAIImagesUser(HttpUser):
    """One-shot generations, as the `openai` client sends them."""

    weight = 3
    wait_time = between(0.1, 1.0)

    @task
    def generate(self) -> None:
        body = {"prompt": random_prompt(), "n": random.choice([1, 1, 1, 2]), "size": SIZE,
                "response_format": random.choice(["b64_json", "url"]), "seed": random_seed(),
                "num_inference_steps": STEPS}
        with self.client.post("/v1/images/generations", json=body, catch_response=True,
                              name="/v1/images/generations") as response:
            check(response)


class DashAIUser(HttpUser):
    """DashAI's front end: a session, then processes polled until they end, then the PNG."""

    weight = 1
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        response = self.client.post("/api/v1/generative-session/", json={
            "task_name": "TextToImageGenerationTask",
            "name": f"locust-{random.randrange(2**63)}",
            "parameters": {"width": WIDTH, "height": HEIGHT, "num_inference_steps": STEPS, "seed": -1},
        })
        response.raise_for_status()
        self.session_id = response.json()["id"]

    @task
    def create_poll_fetch(self) -> None:
        with self.client.post("/api/v1/generative-process/",
                              data={"session_id": str(self.session_id), "text_0": random_prompt()},
                              catch_response=True, name="/api/v1/generative-process/ [create]") as response:
            if not check(response, 201):
                return
            process_id = response.json()["id"]

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            process = self.client.get(f"/api/v1/generative-process/{process_id}",
                                      name="/api/v1/generative-process/{id}").json()
            if process["status"] in (3, 4):
                break
            time.sleep(0.1)
        else:
            return
        for row in process["output"]:
            if row["data_type"] == "Image":
                self.client.get(f"/api/v1/generative-process/image/{row['data']}",
                                name="/api/v1/generative-process/image/{name}")
