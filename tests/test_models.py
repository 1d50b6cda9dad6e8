"""Several models on one server (configuration.yaml's `models:` registry), through the real server.

Three models: `tiny-a` (the default, 64x64), `tiny-b` (other weights, 32x32, at most
4 steps) and `tiny-slow` (its load held 8 s by the test hooks), with room for two
loaded at once: the default and one other.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from t2i_task.local_server import start_server, write_config
from t2i_task.storage.store import Store
from tests.gate import Gate, wait_for, wait_until_queued_at_model
from tests.test_service import TASK, wait_until_ended

LOAD_WAIT_S = 1.0
SLOW_LOAD_S = 8.0


@pytest.fixture(scope="module")
def models(tiny_model_path, tmp_path_factory) -> dict:
    """Three model folders: the tiny model, a copy with other weights, and a copy whose load is slow."""
    folder = tmp_path_factory.mktemp("registry")
    other = shutil.copytree(tiny_model_path, folder / "other-weights")
    unet = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet)
    weights = {name: -tensor if name.startswith("conv_out") else tensor for name, tensor in weights.items()}
    save_file(weights, unet)  # the same architecture, other pictures
    slow = shutil.copytree(tiny_model_path, folder / "slow-to-load")
    return {
        "tiny-a": {"name": "tiny-a", "path": str(tiny_model_path), "aliases": ["a"],
                   "sizes": {"native": 64, "min": 64, "max": 64}, "defaults": {"width": 64, "height": 64}},
        "tiny-b": {"name": "tiny-b", "path": str(other), "sizes": {"native": 32, "min": 32, "max": 32},
                   "defaults": {"width": 32, "height": 32, "num_inference_steps": 2}, "limits": {"max_steps": 4}},
        "tiny-slow": {"name": "tiny-slow", "path": str(slow)},
    }


@pytest.fixture(scope="module")
def registry_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("registry-server")


@pytest.fixture(scope="module")
def registry_gate(registry_folder) -> Gate:
    return Gate(registry_folder)


def registry_config(folder, models):
    return write_config(folder, models=list(models.values()), default_model="tiny-a",
                        runtime={"max_loaded_models": 2}, serving={"model_load_wait_s": LOAD_WAIT_S},
                        defaults={"num_inference_steps": 2}, limits={"min_size": 32})


@pytest.fixture(scope="module")
def registry_server(models, registry_folder, registry_gate):
    env = registry_gate.env(T2I_TEST_LOAD_DELAY_S=str(SLOW_LOAD_S), T2I_TEST_SLOW_LOADS="slow-to-load")
    server = start_server(registry_config(registry_folder, models), env=env)
    yield server
    server.stop()


@pytest.fixture
def api(registry_server):
    with httpx.Client(base_url=registry_server.url, timeout=120) as client:
        yield client


def generate(api, model: str | None, **body) -> httpx.Response:
    return api.post("/v1/images/generations", json={"prompt": "a red circle", "response_format": "b64_json",
                                                    **({"model": model} if model else {}), **body})


def picture(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def loaded(api) -> dict[str, bool]:
    return {model["id"]: model["loaded"] for model in api.get("/v1/models").json()["data"]}


def batch_totals(api) -> dict[str, tuple[float, float]]:
    """(requests, model calls) so far per model, from t2i_model_batch_size{model=...}."""
    text = api.get("/metrics").text
    totals: dict[str, list[float]] = {}
    for kind, model, value in re.findall(r'^t2i_model_batch_size_(sum|count)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$',
                                         text, re.MULTILINE):
        totals.setdefault(model, [0.0, 0.0])[kind == "count"] += float(value)
    return {model: (sum_, count) for model, (sum_, count) in totals.items()}


def test_every_model_is_listed_with_its_sizes_and_answers_at_them(api):
    listed = {model["id"]: model for model in api.get("/v1/models").json()["data"]}
    assert list(listed) == ["tiny-a", "tiny-b", "tiny-slow"]  # the default first
    assert listed["tiny-a"]["sizes"]["native"] == 64 and listed["tiny-b"]["defaults"]["width"] == 32
    assert listed["tiny-a"]["loaded"] and not listed["tiny-slow"]["loaded"]
    # The size each draws: its own native size for "auto"; 128x128 drawn inside its range, resized.
    for model, native in (("tiny-a", 64), ("a", 64), ("dall-e-3", 64), (None, 64), ("tiny-b", 32)):
        auto = generate(api, model, size="auto")
        assert auto.status_code == 200 and auto.json()["size"] == f"{native}x{native}", (model, auto.text)
        asked = generate(api, model, size="128x128")
        assert asked.json()["size"] == f"{native}x{native}" and picture(asked).shape == (128, 128, 3)
    refused = generate(api, "tiny-b", num_inference_steps=8)  # its own limit, not the default's
    assert refused.status_code == 400 and "num_inference_steps must be between 1 and 4" in refused.text
    unknown = generate(api, "sdxl")
    assert unknown.status_code == 400 and "tiny-a" in unknown.json()["error"]["message"]
    assert unknown.json()["error"]["param"] == "model"


def test_dashais_component_list_shows_each_model_with_its_own_form(api):
    components = api.get("/api/v1/component/", params={"related_component": TASK}).json()
    forms = {component["name"]: component["schema"]["properties"] for component in components}
    assert list(forms) == ["tiny-a", "tiny-b", "tiny-slow"]
    assert forms["tiny-a"]["width"]["placeholder"] == 64 and forms["tiny-b"]["width"]["placeholder"] == 32
    assert forms["tiny-b"]["num_inference_steps"]["maximum"] == 4
    created = api.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "unknown",
                                                            "model_name": "sdxl"})
    assert created.status_code == 400 and created.json()["detail"].startswith("Model sdxl is not registered.")


def test_concurrent_requests_for_two_models_batch_by_model_and_each_gets_its_own_picture(
        api, registry_server, registry_gate):
    alone = {model: picture(generate(api, model, size="auto", seed=11)) for model in ("tiny-a", "tiny-b")}
    assert alone["tiny-a"].shape != alone["tiny-b"].shape or np.abs(alone["tiny-a"] - alone["tiny-b"]).max() > 10
    before = batch_totals(api)
    calls = [("tiny-a" if i % 2 else "tiny-b", 11 if i < 2 else 100 + i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool, registry_gate.closed():
        first = pool.submit(generate, api, "tiny-a", size="auto", seed=99)
        registry_gate.wait_until_held()
        futures = [pool.submit(generate, api, model, size="auto", seed=seed) for model, seed in calls]
        wait_until_queued_at_model(registry_server.url, 16)  # the scheduler hands over two batches at most
    assert first.result().status_code == 200
    results = [future.result() for future in futures]
    assert all(result.status_code == 200 for result in results)
    # Each model's requests ran together, never with the other's (the metric counts per model).
    after = batch_totals(api)
    for model in ("tiny-a", "tiny-b"):
        requests = after[model][0] - before.get(model, (0, 0))[0]
        assert requests == 8 + (model == "tiny-a"), (model, requests)
        assert after[model][1] - before.get(model, (0, 0))[1] <= 3  # batched, not one call a request
    # The same seed gives the same picture alone and in the mixed batch: no model drew another's.
    for (model, seed), result in zip(calls, results):
        if seed == 11:
            assert np.abs(picture(result) - alone[model]).max() <= 2, model


def test_a_slow_load_answers_503_then_the_least_recently_used_model_makes_room(api):
    assert loaded(api) == {"tiny-a": True, "tiny-b": True, "tiny-slow": False}
    waiting = generate(api, "tiny-slow")
    assert waiting.status_code == 503 and int(waiting.headers["retry-after"]) >= 1
    assert "loading" in waiting.json()["error"]["message"]
    # The load goes on, and does not hold up the default model meanwhile.
    assert generate(api, "tiny-a").status_code == 200
    assert loaded(api)["tiny-slow"] is False
    # Two loaded at most: the least recently used idle one (tiny-b) made room; never the default.
    wait_for(lambda: loaded(api)["tiny-slow"], timeout=SLOW_LOAD_S * 6, what="tiny-slow to load")
    assert generate(api, "tiny-slow").status_code == 200
    assert loaded(api) == {"tiny-a": True, "tiny-b": False, "tiny-slow": True}
    metrics = api.get("/metrics").text
    assert re.search(r'^t2i_model_loaded\{[^}]*model="tiny-b"[^}]*\} 0', metrics, re.MULTILINE)
    # A queued DashAI process for an unloaded model waits for its load instead of failing.
    session = api.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "waits for b",
                                                            "model_name": "tiny-b"}).json()
    process = api.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["a square"]})
    assert wait_until_ended(api, process.json()["id"])["status"] == 3


def test_switching_a_sessions_model_keeps_what_the_user_set_and_takes_the_new_defaults(api):
    created = api.post("/api/v1/generative-session/", json={
        "task_name": TASK, "name": "switching", "model_name": "tiny-a", "parameters": {"seed": 5}})
    session = created.json()
    assert session["parameters"]["width"] == 64 and session["parameters"]["seed"] == 5
    switched = api.patch(f"/api/v1/generative-session/{session['id']}", params={"model_name": "tiny-b"})
    assert switched.status_code == 200, switched.text
    parameters = switched.json()["parameters"]
    assert switched.json()["model_name"] == "tiny-b"
    assert (parameters["width"], parameters["num_inference_steps"], parameters["seed"]) == (32, 2, 5)
    process = api.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["a circle"]})
    ended = wait_until_ended(api, process.json()["id"])
    assert ended["status"] == 3
    image = api.get(f"/api/v1/generative-process/image/{ended['output'][0]['data']}")
    assert Image.open(io.BytesIO(image.content)).text["model"] == "tiny-b"
    # A value the user set that the new model cannot take: the switch is refused, naming it.
    api.put(f"/api/v1/generative-session/{session['id']}/parameters", json={"num_inference_steps": 4})
    api.patch(f"/api/v1/generative-session/{session['id']}", params={"model_name": "tiny-a"})
    api.put(f"/api/v1/generative-session/{session['id']}/parameters", json={"num_inference_steps": 9})
    refused = api.patch(f"/api/v1/generative-session/{session['id']}", params={"model_name": "tiny-b"})
    assert refused.status_code == 422 and refused.json()["field"] == "num_inference_steps"
    assert api.get(f"/api/v1/generative-session/{session['id']}").json()["model_name"] == "tiny-a"
    assert api.patch(f"/api/v1/generative-session/{session['id']}",
                     params={"model_name": "sdxl"}).status_code == 400


def test_a_process_resumed_after_a_restart_runs_as_it_was_stored(models, registry_server, registry_gate,
                                                                 registry_folder):
    """Its session changed while the server was down: the process still runs with its own model and parameters."""
    with httpx.Client(base_url=registry_server.url, timeout=120) as api:
        session = api.post("/api/v1/generative-session/", json={
            "task_name": TASK, "name": "resumed", "model_name": "tiny-a", "parameters": {"seed": 21}}).json()
        with registry_gate.closed():
            held = api.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["held"]})
            registry_gate.wait_until_held()
            queued = api.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["queued"]})
            registry_server.kill()
    store = Store(f"sqlite:///{registry_folder / 't2i.db'}", registry_folder / "images")
    store.update_session(session["id"], model_name="tiny-b", parameters={**session["parameters"], "seed": 22})
    store.close()
    restarted = start_server(registry_config(registry_folder, models), env=registry_gate.env(), log_name="restarted.log")
    try:
        with httpx.Client(base_url=restarted.url, timeout=120) as api:
            for process in (held.json(), queued.json()):
                ended = wait_until_ended(api, process["id"])
                assert ended["status"] == 3, ended
                image = api.get(f"/api/v1/generative-process/image/{ended['output'][0]['data']}")
                text = Image.open(io.BytesIO(image.content)).text
                assert (text["model"], text["seed"], text["drawn_size"]) == ("tiny-a", "21", "64x64")
    finally:
        restarted.stop()
