"""The real server over real HTTP: DashAI's flow, OpenAI's client, batching, errors."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from t2i_task.local_server import start_server, write_config
from tests.gate import Gate, wait_for, wait_until_queued_at_model

TASK = "TextToImageGenerationTask"
BATCH_TOLERANCE = 2  # as in test_runner: rounding differences between batch sizes, of 255


def create_session(http, name, **parameters) -> dict:
    response = http.post(
        "/api/v1/generative-session/",
        json={"task_name": TASK, "model_name": "tiny-sd", "name": name, "parameters": parameters},
    )
    assert response.status_code == 201, response.text
    return response.json()


def wait_until_ended(http, process_id: int) -> dict:
    def ended():
        process = http.get(f"/api/v1/generative-process/{process_id}").json()
        return process if process["status"] in (3, 4) else None

    return wait_for(ended, what=f"process {process_id} ended")


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def batch_size_totals(http) -> tuple[float, float]:
    """(sum, count) of the requests in each of the model's batches, from /metrics (zeros before the first batch)."""
    text = http.get("/metrics").text
    totals = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^t2i_model_batch_size_{kind}(?:{{[^}}]*}})? (\S+)$',
                          text, re.MULTILINE)
        totals[kind] = float(match[1]) if match else 0.0
    return totals["sum"], totals["count"]


def test_health_endpoints_answer(http):
    assert http.get("/readyz").status_code == 200
    assert http.get("/livez").status_code == 200
    assert "bentoml_service_request_total" in http.get("/metrics").text


def test_dashai_flow_from_session_to_png(http):
    session = create_session(http, "dashai-flow", width=96, height=64, seed=11, num_inference_steps=2)
    assert session["parameters"]["width"] == 96 and session["model_name"] == "tiny-sd"

    created = http.post("/api/v1/generative-process/", data={"session_id": str(session["id"]), "text_0": "a red circle"})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == 1  # DELIVERED: answered before the image exists
    assert created.json()["input"] == [{"id": created.json()["input"][0]["id"], "data": "a red circle", "data_type": "str"}]

    process = wait_until_ended(http, created.json()["id"])
    assert process["status"] == 3, process
    assert process["start_time"] and process["end_time"] >= process["start_time"]
    [row] = process["output"]
    assert row["data_type"] == "Image" and re.fullmatch(r"[0-9a-f-]{36}\.png", row["data"])

    image = http.get(f"/api/v1/generative-process/image/{row['data']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(image.content))
    assert png.size == (96, 64)
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "11" and png.text["model"] == "tiny-sd"

    as_base64 = http.get(f"/api/v1/generative-process/{process['id']}", params={"base64": "true"}).json()
    assert base64.b64decode(as_base64["output"][0]["data"]) == image.content


def test_processes_are_listed_per_session_and_deleted_with_their_files(http):
    session = create_session(http, "listing", num_inference_steps=1)
    ids = []
    for prompt in ("one", "two"):
        response = http.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": [prompt]})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    ended = [wait_until_ended(http, i) for i in ids]

    listed = http.get(f"/api/v1/generative-process/session/{session['id']}").json()
    assert [p["id"] for p in listed] == ids and [p["input"][0]["data"] for p in listed] == ["one", "two"]

    image_name = ended[0]["output"][0]["data"]
    assert http.delete(f"/api/v1/generative-process/{ids[0]}").status_code == 204
    assert http.get(f"/api/v1/generative-process/{ids[0]}").status_code == 404
    assert http.get(f"/api/v1/generative-process/image/{image_name}").status_code == 404
    assert [p["id"] for p in http.get(f"/api/v1/generative-process/session/{session['id']}").json()] == ids[1:]


def test_session_parameters_can_be_updated(http):
    session = create_session(http, "updates")
    response = http.put(f"/api/v1/generative-session/{session['id']}/parameters",
                        json={"parameters": {"width": 128, "height": 64}})
    assert response.status_code == 200, response.text
    assert http.get(f"/api/v1/generative-session/{session['id']}").json()["parameters"]["width"] == 128

    process = http.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["x"]}).json()
    name = wait_until_ended(http, process["id"])["output"][0]["data"]
    assert Image.open(io.BytesIO(http.get(f"/api/v1/generative-process/image/{name}").content)).size == (128, 64)


def test_task_metadata_is_served(http):
    assert http.get("/api/v1/task/metadata").json() == {
        "inputs_types": ["str"], "outputs_types": ["Image"], "inputs_cardinality": 1, "outputs_cardinality": "n",
    }


def test_openai_client_gets_base64_images_and_the_call_is_recorded(client, http):
    assert [model.id for model in client.models.list()] == ["tiny-sd"]
    result = client.images.generate(
        model="tiny-sd", prompt="a blue square", n=2, size="64x96", response_format="b64_json",
        extra_body={"seed": 21, "num_inference_steps": 2, "guidance_scale": 5.0, "negative_prompt": "red"},
    )
    assert len(result.data) == 2 and result.created > 0
    assert [decode(item.b64_json).shape for item in result.data] == [(96, 64, 3), (96, 64, 3)]

    sessions = [s for s in http.get("/api/v1/generative-session/").json() if s["name"] == "openai-images-tiny-sd"]
    [recorded] = [p for p in http.get(f"/api/v1/generative-process/session/{sessions[0]['id']}").json()
                  if p["input"][0]["data"] == "a blue square"]
    assert recorded["status"] == 3 and len(recorded["output"]) == 2


def test_openai_client_gets_urls_that_serve_the_png(client, http):
    result = client.images.generate(prompt="a green triangle", size="64x64", response_format="url",
                                     extra_body={"num_inference_steps": 1})
    [item] = result.data
    png = httpx.get(item.url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)


def test_openai_errors_name_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(model="stable-diffusion-xl", prompt="a cat")  # OpenAI's own names all reach it
    assert error.value.body["param"] == "model" and "tiny-sd" in error.value.body["message"]

    for call, param in (
        (dict(prompt="a cat", size="65x64"), "size"),
        (dict(prompt="a cat", size="big"), "size"),
        (dict(prompt="a cat", n=50), "n"),
        (dict(prompt="", size="64x64"), "prompt"),
        (dict(prompt="a cat", extra_body={"num_inference_steps": 0}), "num_inference_steps"),
        (dict(prompt="a cat", extra_body={"num_inference_steps": 10_000}), "num_inference_steps"),
    ):
        with pytest.raises(openai.BadRequestError) as error:
            client.images.generate(**call)
        assert error.value.status_code == 400
        assert error.value.body["param"] == param, (call, error.value.body)
        assert error.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"width": 100}, "width"),
        ({"height": 4096}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1000}, "num_inference_steps"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"num_images_per_prompt": 99}, "num_images_per_prompt"),
        ({"negative_prompt": "nul \x00 inside"}, "negative_prompt"),
    ],
)
def test_bad_session_parameters_get_a_422_naming_the_field(http, parameters, field):
    response = http.post(
        "/api/v1/generative-session/", json={"task_name": TASK, "name": f"bad-{field}", "parameters": parameters}
    )
    assert response.status_code == 422
    assert response.json()["field"] == field and field in response.json()["detail"]


def test_session_names_with_nul_are_refused_before_the_database(http):
    # PostgreSQL cannot store NUL in text: refused as input, never a 500 from the database.
    response = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "a\x00b"})
    assert response.status_code == 422 and response.json()["field"] == "name"


def test_unregistered_model_or_task_is_a_400(http):
    for body, message in (
        ({"task_name": "ImageClassificationTask", "name": "x"}, "Task ImageClassificationTask is not registered."),
        ({"task_name": TASK, "model_name": "sdxl", "name": "y"}, "Model sdxl is not registered."),
    ):
        response = http.post("/api/v1/generative-session/", json=body)
        assert response.status_code == 400 and response.json()["detail"].startswith(message)


def test_process_errors_are_json_and_store_nothing(http):
    session = create_session(http, "errors")
    cases = [
        ({"json": {"session_id": 99999, "input": ["a cat"]}}, 404, "Session with ID 99999 does not exist."),
        ({"json": {"session_id": session["id"]}}, 422, "input"),
        ({"data": {"session_id": str(session["id"])}}, 422, "input"),
        ({"json": {"session_id": session["id"], "input": ["   "]}}, 422, "prompt is empty"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ]
    for request, status, message in cases:
        response = http.post("/api/v1/generative-process/", **request)
        assert response.status_code == status, (request, response.text)
        assert message in response.json()["detail"]
    assert http.get(f"/api/v1/generative-process/session/{session['id']}").json() == []


@pytest.mark.parametrize("route", ["image", "file"])  # older DashAI front ends, and the current one
@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2Fetc%2Fpasswd", "..", "missing.png", "t2i.db"])
def test_image_route_serves_only_bare_png_names(server, route, name):
    response = httpx.get(f"{server.url}/api/v1/generative-process/{route}/{name}")
    # 404, or 405 where the client resolved ".." to the process route before sending
    assert response.status_code in (404, 405)
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json()


def test_image_route_does_not_follow_symlinks(server, http):
    images = server.config.parent / "images"
    images.mkdir(exist_ok=True)
    (images / "escape.png").symlink_to(server.config)
    assert http.get("/api/v1/generative-process/image/escape.png").status_code == 404


def send_behind_a_running_batch(server, gate, pool, calls) -> list:
    """Run `calls[0]` and hold it in the pipeline until all the others wait at the model
    behind it: they are then batched together, whatever this machine's speed."""
    with gate.closed():
        first = pool.submit(calls[0])
        gate.wait_until_held()
        rest = [pool.submit(call) for call in calls[1:]]
        wait_until_queued_at_model(server.url, len(calls))
    return [first.result(), *(future.result() for future in rest)]


def test_concurrent_requests_share_batches(server, gate, http, client):
    def generate(i):
        return lambda: client.images.generate(prompt=f"prompt {i}", size="64x64", response_format="b64_json",
                                              extra_body={"seed": i, "num_inference_steps": 4})

    before = batch_size_totals(http)
    with ThreadPoolExecutor(16) as pool:
        results = send_behind_a_running_batch(server, gate, pool, [generate(i) for i in range(16)])
    after = batch_size_totals(http)

    assert all(len(r.data) == 1 for r in results)
    batches, requests = after[1] - before[1], after[0] - before[0]
    assert requests == 16
    # The first alone, then the fifteen that waited, in batches of up to 8.
    assert batches == 3, f"16 requests ran in {batches:.0f} batches"


def test_sustained_concurrent_load_gets_no_server_errors(server):
    # Past 100 calls BentoML's inter-service client renews its session, cutting
    # calls in flight; the service must absorb that, not answer 500.
    def call(i):
        return httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={
            "prompt": f"load {i}", "seed": i, "size": "64x64", "num_inference_steps": 1, "response_format": "b64_json",
        }).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(160)))
    assert statuses.count(200) == 160, {s: statuses.count(s) for s in set(statuses)}


def test_a_seed_gives_the_same_image_alone_and_inside_a_batch(server, gate, client):
    def generate(prompt, seed):
        return lambda: decode(client.images.generate(
            prompt=prompt, size="64x64", response_format="b64_json",
            extra_body={"seed": seed, "num_inference_steps": 3},
        ).data[0].b64_json)

    alone = generate("a white circle", 777)()
    with ThreadPoolExecutor(16) as pool:
        loaded = send_behind_a_running_batch(server, gate, pool, [
            generate("a white circle", 777) if i == 7 else generate(f"noise {i}", 1000 + i) for i in range(16)
        ])
    assert np.abs(alone - loaded[7]).max() <= BATCH_TOLERANCE
    assert np.abs(alone - loaded[8]).max() > 10


def hand_over_behind_a_running_call(server, gate, http, name: str) -> tuple[dict, dict]:
    """Two DashAI processes: the first held in the pipeline, the second handed to the model client
    and waiting there for the next call (the model has room: the scheduler let it go)."""
    sid = create_session(http, name, width=64, height=64, num_inference_steps=2)["id"]

    def submit(prompt):
        created = http.post("/api/v1/generative-process/", json={"session_id": sid, "input": [prompt]})
        assert created.status_code == 201, created.text
        return created.json()

    running = submit(f"{name}: running")
    gate.wait_until_held()
    waiting = submit(f"{name}: waiting")
    wait_until_queued_at_model(server.url, 2)
    return running, waiting


def test_a_process_is_stamped_started_when_its_call_is_sent_and_not_before(server, gate, http):
    with gate.closed():
        running, waiting = hand_over_behind_a_running_call(server, gate, http, "stamped")
        sent = http.get(f"/api/v1/generative-process/{running['id']}").json()
        assert sent["status"] == 2 and sent["start_time"] is not None
        handed_over = http.get(f"/api/v1/generative-process/{waiting['id']}").json()
        assert handed_over["status"] == 1 and handed_over["start_time"] is None

        cancelled = http.post(f"/api/v1/generative-process/{waiting['id']}/cancel")
        assert cancelled.status_code == 202
        ended = cancelled.json()
        assert ended["status"] == 4 and ended["start_time"] is None
        assert [row["data"] for row in ended["output"]] == ["Error details: cancelled"]
        job = http.get(f"/api/v1/job/{waiting['id']}").json()
        assert job["status"] == "cancelled" and job["error_msg"] is None
    assert wait_until_ended(http, running["id"])["status"] == 3
    assert http.get(f"/api/v1/generative-process/{waiting['id']}").json()["start_time"] is None


def test_dashais_job_delete_cancels_like_the_process_cancel(server, gate, http):
    with gate.closed():
        running, waiting = hand_over_behind_a_running_call(server, gate, http, "job-delete")
        assert http.delete(f"/api/v1/job/{waiting['id']}").status_code == 204
        ended = http.get(f"/api/v1/generative-process/{waiting['id']}").json()
        assert ended["status"] == 4 and ended["start_time"] is None
        assert [row["data"] for row in ended["output"]] == ["Error details: cancelled"]
        assert http.get(f"/api/v1/job/{waiting['id']}").json()["status"] == "cancelled"
        again = http.delete(f"/api/v1/job/{waiting['id']}")
        assert again.status_code == 409 and "already ended" in again.json()["detail"]
        assert http.delete("/api/v1/job/999999").status_code == 404
        # DashAI's "clear all": the running one too; it stops at its next step.
        assert http.delete("/api/v1/job/all").json() == {"cancelled": 1}
    assert wait_until_ended(http, running["id"])["status"] == 4
    assert http.get(f"/api/v1/job/{running['id']}").json()["status"] == "cancelled"
    assert http.delete("/api/v1/job/all").json() == {"cancelled": 0}


def test_unknown_routes_and_methods_get_json_errors(http):
    assert http.get("/api/v1/nothing").status_code == 404
    assert http.get("/api/v1/nothing").json()["detail"] == "No route /api/v1/nothing."
    response = http.delete("/v1/models")
    assert response.status_code == 405 and "error" in response.json()


def test_overload_is_refused_with_json_429_and_accepted_work_ends(tiny_model_path, tmp_path):
    gate = Gate(tmp_path)
    config = write_config(tmp_path, tiny_model_path, serving={"max_concurrency": 2, "max_queued_generations": 2})
    server = start_server(config, env=gate.env())
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http, ThreadPoolExecutor(8) as pool:
            with gate.closed():
                answers = [pool.submit(http.post, "/v1/images/generations", json={"prompt": f"p{i}", "seed": i})
                           for i in range(8)]
                # Two are admitted and held in the pipeline; the other six are refused at once.
                wait_for(lambda: sum(answer.done() for answer in answers) == 6, what="six refusals")
            statuses = sorted(answer.result().status_code for answer in answers)
            assert statuses == [200] * 2 + [429] * 6, statuses
            assert all(answer.result().json() for answer in answers)  # refusals included, every answer is JSON

            session = create_session(http, "overload")
            with gate.closed():
                created = [
                    http.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": [f"q{i}"]})
                    for i in range(5)
                ]
            accepted = [r.json()["id"] for r in created if r.status_code == 201]
            refused = [r for r in created if r.status_code == 429]
            assert len(accepted) == 2 and len(refused) == 3
            assert all(r.headers["retry-after"] and "busy" in r.json()["detail"] for r in refused)
            assert [wait_until_ended(http, i)["status"] for i in accepted] == [3, 3]
            stored = http.get(f"/api/v1/generative-process/session/{session['id']}").json()
            assert sorted(p["id"] for p in stored) == sorted(accepted), "refused processes must not be stored"
    finally:
        server.stop()


def test_lists_page_with_limit_and_offset_and_give_everything_without(http):
    sessions = [create_session(http, f"paged-{i}")["id"] for i in range(3)]
    everything = [s["id"] for s in http.get("/api/v1/generative-session/").json()]
    assert everything[-3:] == sessions  # oldest first, all of them
    page = http.get("/api/v1/generative-session/", params={"limit": 2, "offset": len(everything) - 3}).json()
    assert [s["id"] for s in page] == sessions[:2]
    processes = [http.post("/api/v1/generative-process/", json={"session_id": sessions[0], "input": [f"p{i}"]}).json()
                 for i in range(3)]
    listed = http.get(f"/api/v1/generative-process/session/{sessions[0]}", params={"limit": 1, "offset": 1}).json()
    assert [p["id"] for p in listed] == [processes[1]["id"]]
    jobs = http.get("/api/v1/job/", params={"limit": 2}).json()
    assert [job["id"] for job in jobs] == [processes[2]["id"], processes[1]["id"]]  # newest first
    assert [job["id"] for job in http.get("/api/v1/job/", params={"limit": 1, "offset": 2}).json()] == [processes[0]["id"]]
    for path in ("/api/v1/generative-session/", "/api/v1/job/"):
        for bad in ({"limit": 0}, {"limit": 5000}, {"offset": -1}):
            refused = http.get(path, params=bad)
            assert refused.status_code == 422 and refused.json()["field"] in bad, (path, bad)
    for process in processes:
        wait_until_ended(http, process["id"])
