"""OpenAI's image streaming through the stock `openai` client: partial images decoded while the
image is drawn, then the image; a streaming client that leaves cancels its generation."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.gate import wait_for
from tests.test_job_control import steps_run
from tests.test_openai_params import MAGIC

LONG = 400


@pytest.fixture(scope="module")
def server_config():
    # Every request is estimated at 1 s of a 6.4 s budget, so a 400-step one is admitted.
    return {"model": {"cost": {"overhead_s": 1.0, "seconds_per_megapixel_step": 0.001}}, "limits": {"max_steps": LONG},
            "serving": {"request_timeout_s": 60}, "batching": {"max_latency_ms": 8000}}


@pytest.fixture(scope="module")
def server_env():
    return {"T2I_TEST_POISON": "poison"}


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def process_of(http, prompt: str) -> dict:
    [session] = [s for s in http.get("/api/v1/generative-session/").json() if s["name"].startswith("openai-")]
    [process] = [p for p in http.get(f"/api/v1/generative-process/session/{session['id']}").json()
                 if p["input"][0]["data"] == prompt]
    return process


def test_partial_images_arrive_while_the_image_is_drawn_then_the_image(client, http, gate):
    prompt = "a red circle on a blue background"
    events, running_at_first_partial = [], None
    # 10 steps, 2 partial images: decoded after steps 4 and 7; the call waits after step 5.
    with gate.holding_after_step(5) as reached:
        stream = client.images.generate(prompt=prompt, size="64x64", stream=True, partial_images=2,
                                        extra_body={"num_inference_steps": 10, "seed": 4})
        for event in stream:
            events.append(event)
            if len(events) == 1:
                running_at_first_partial = (reached(), process_of(http, prompt)["status"])
                gate.path.with_name("gate.hold-after-step").unlink()  # let the call go on
    assert running_at_first_partial == (True, 2), "the first partial image came only after the call"
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert (event.size, event.output_format, event.background, event.quality) == ("64x64", "png", "opaque", "medium")
        assert picture(event.b64_json).size == (64, 64) and event.created_at > 0
    completed = events[-1]
    assert completed.usage.input_tokens == completed.usage.input_tokens_details.text_tokens > 0
    # The completed image is the stored one; the partials are earlier, different states of it.
    process = process_of(http, prompt)
    assert process["status"] == 3
    stored = http.get(f"/api/v1/generative-process/file/{process['output'][0]['data']}").content
    assert base64.b64decode(completed.b64_json) == stored
    final = np.asarray(picture(completed.b64_json).convert("RGB"), dtype=np.int16)
    partials = [np.asarray(picture(e.b64_json).convert("RGB"), dtype=np.int16) for e in events[:2]]
    assert np.abs(partials[0] - final).mean() > np.abs(partials[1] - final).mean() > 0


def test_a_stream_without_partial_images_is_one_completed_event_and_seeds_reproduce(client):
    settings = {"prompt": "a blue square", "size": "64x64", "extra_body": {"seed": 9}}
    [event] = list(client.images.generate(stream=True, partial_images=0, **settings))
    plain = client.images.generate(response_format="b64_json", **settings)
    assert event.type == "image_generation.completed"
    assert np.array_equal(np.asarray(picture(event.b64_json)), np.asarray(picture(plain.data[0].b64_json)))


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_streamed_images_come_in_the_asked_output_format(client, output_format):
    events = list(client.images.generate(prompt="a circle", size="64x64", stream=True, partial_images=1,
                                         output_format=output_format, output_compression=50))
    assert len(events) == 2
    for event in events:
        data = base64.b64decode(event.b64_json)
        assert data[:4] == b"RIFF" if output_format == "webp" else data.startswith(MAGIC[output_format])
        assert event.output_format == output_format


def test_a_failed_generation_ends_the_stream_with_an_error_event(client):
    with pytest.raises(openai.APIError, match="out of memory"):
        list(client.images.generate(prompt="poison", size="64x64", stream=True, partial_images=1))


def test_a_streaming_client_that_leaves_cancels_its_generation(server, http, gate, server_folder):
    prompt = "a stream nobody reads"
    body = {"prompt": prompt, "size": "64x64", "stream": True, "partial_images": 1, "num_inference_steps": LONG}
    with gate.holding_after_step(LONG // 2):  # its one partial image is decoded there
        with httpx.stream("POST", f"{server.url}/v1/images/generations", json=body, timeout=60) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream"), stream.read()
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    assert json.loads(line.removeprefix("data:"))["type"] == "image_generation.partial_image"
                    break  # and the client goes away
        process = wait_for(lambda: (p := process_of(http, prompt))["status"] == 4 and p,
                           what="the left stream's process to be cancelled")
        assert [row["data"] for row in process["output"]] == ["Error details: cancelled"]
    [steps] = wait_for(lambda: steps_run(server_folder, prompt), what="the left call to return")
    assert steps <= LONG // 2 + 2, f"the left call ran {steps} of {LONG} steps"
    # Its slot is free: the next call runs.
    assert http.post("/v1/images/generations", json={"prompt": "next", "size": "64x64"}).status_code == 200
