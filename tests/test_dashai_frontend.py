"""DashAI's own web front end against this server: served at /app/ and walked in a real browser, and
its calls replayed in its order, with its bodies.

The calls, their shapes and the front end's behaviour (poll every 1.5 s, retry a
taken session name with `_1`, delete a failed process) are those recorded in
shared/notes/dashai-contract.md from DashAI 0.10.0's `front/src/api/*.ts`.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from t2i_task.api.dashai_front_end import build_folder
from t2i_task.local_server import start_server, write_config
from tests.browser import SCREENSHOTS
from tests.dashai_walk import walk_generative_chat
from tests.gate import wait_for

TASK = "TextToImageGenerationTask"
FRONT_END = "http://localhost:3000"  # DashAI's development server, another origin
POLL_S = 1.5  # the front end's polling interval


@pytest.fixture(scope="module")
def dashai_server(tmp_path_factory):
    """The shipped configuration (`make serve`'s model and limits), allowing the front end's origin."""
    folder = tmp_path_factory.mktemp("dashai-frontend")
    server = start_server(write_config(folder), env={"T2I_CORS_ORIGINS": FRONT_END})
    yield server
    server.stop()


@pytest.fixture
def ui(dashai_server):
    """The browser: every call carries the front end's Origin, as a page on another origin sends it."""
    with httpx.Client(base_url=f"{dashai_server.url}/api", headers={"Origin": FRONT_END}, timeout=60) as client:
        yield client


def create_session_as_the_ui_does(ui, name: str, model: dict) -> dict:
    """The form's values from the schema's placeholders, then the UI's exact body; a taken name is retried with _1."""
    form = {key: field["placeholder"] for key, field in model["schema"]["properties"].items()}
    for attempt in (name, f"{name}_1"):
        body = {"name": attempt, "description": "made by the front end", "task_name": TASK,
                "model_name": model["name"], "parameters": {**form, "name": attempt,
                                                            "description": "made by the front end"}}
        response = ui.post("/v1/generative-session/", json=body)
        if response.status_code != 409:
            break
    assert response.status_code == 201, response.text
    return response.json()


def ask(ui, session_id: int, prompt: str) -> dict:
    """A prompt in the chat: the process, then its job, then polling until FINISHED or ERROR."""
    created = ui.post("/v1/generative-process/", files={"session_id": (None, str(session_id)),
                                                         "text_0": (None, prompt)})
    assert created.status_code == 201, created.text
    process_id = created.json()["id"]
    job = ui.post("/v1/job/", files={"job_type": (None, "GenerativeJob"),
                                     "kwargs": (None, json.dumps({"generative_process_id": process_id}))})
    assert job.status_code == 201 and job.json()["id"], job.text

    def ended():
        process = ui.get(f"/v1/generative-process/{process_id}").json()
        return process if process["status"] in (3, 4) else None

    return wait_for(ended, interval=POLL_S, what=f"process {process_id} ended")


def test_the_front_end_loads_without_errors(ui):
    """Every page's calls: the job queue widget, the sections this server does not serve, the task lists."""
    assert ui.get("/v1/job/").status_code == 200
    changes = ui.get("/v1/job/changes", params={"since": "2026-01-01 00:00:00.000"})
    assert changes.status_code == 200 and {"jobs", "cursor", "server_now", "queue_empty"} <= set(changes.json())
    for section in ("model-session/", "dataset/", "folder/", "credential/"):
        assert ui.get(f"/v1/{section}").json() == []
    for query in ({"select_types": "Model"}, {"select_types": "Metric"},
                  {"select_types": "Task", "has_related_of_type": "Model"}):
        assert ui.get("/v1/component/", params=query).json() == []
    unknown = ui.get("/v1/component/", params={"select_types": "Spaceship"})
    assert unknown.status_code == 422 and "GenerativeTask" in unknown.json()["detail"]


def test_the_text_to_image_chat_end_to_end(ui, dashai_server):
    images = dashai_server.config.parent / "images"

    [task] = ui.get("/v1/component/", params={"select_types": "GenerativeTask"}).json()
    assert task["name"] == TASK and task["metadata"]["inputs"] == {"str": {"min": 1, "max": 1}}
    assert task["metadata"]["outputs_types"] == ["Image"]  # older front ends read the seed's keys
    models = ui.get("/v1/component/", params={"related_component": TASK}).json()
    assert [m["name"] for m in models] == ["shapes-64", "shapes-32"], "each model of the registry, the default first"
    model = models[0]
    assert model["type"] == "GenerativeModel" and model["downloaded"] and not model["metadata"]["requires_download"]
    assert ui.get(f"/v1/component/{model['name']}/").json() == model
    assert ui.get(f"/v1/component/{model['name']}/download").json() == {"downloaded": True,
                                                                        "requires_download": False}
    # An optional text starts blank and offers null first: the front end's form then shows no field in red
    # (tests/dashai_walk.py) and keeps the null the server stores for an empty one.
    negative = model["schema"]["properties"]["negative_prompt"]
    assert negative["placeholder"] == " " and [option["type"] for option in negative["anyOf"]] == ["null", "string"]
    width = model["schema"]["properties"]["width"]
    assert (width["placeholder"], width["minimum"], width["maximum"]) == (64, 32, 2048)
    assert model["schema"]["properties"]["device"]["placeholder"] == "CPU"

    session = create_session_as_the_ui_does(ui, "chat", model)
    assert session["parameters"]["device"] == "CPU" and session["parameters"]["width"] == 64
    assert session["parameters"]["negative_prompt"] is None, "a blank one is stored as none"
    assert create_session_as_the_ui_does(ui, "chat", model)["name"] == "chat_1"  # the UI's retry on 409

    process = ask(ui, session["id"], "a red circle on a blue background")
    assert process["status"] == 3, process
    [image] = process["output"]
    picture = ui.get(f"/v1/generative-process/file/{image['data']}")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.headers["access-control-allow-origin"] == FRONT_END
    assert Image.open(io.BytesIO(picture.content)).size == (64, 64)
    assert ui.get(f"/v1/job/{process['id']}").json()["status"] == "finished"

    # The settings panel sends the changed values bare; DashAI merges them into the old ones.
    updated = ui.put(f"/v1/generative-session/{session['id']}/parameters", json={"seed": 7, "width": 80})
    assert updated.status_code == 200 and updated.json()["parameters"]["height"] == 64
    assert ask(ui, session["id"], "a green square")["status"] == 3
    history = ui.get(f"/v1/generative-session/parameters-history/{session['id']}").json()
    assert history[-1]["changes"] == [{"parameter": "seed", "oldValue": -1, "newValue": 7},
                                      {"parameter": "width", "oldValue": 64, "newValue": 80}]
    bad = ui.put(f"/v1/generative-session/{session['id']}/parameters", json={"width": 4000})
    assert bad.status_code == 422 and bad.json()["field"] == "width"

    renamed = ui.patch(f"/v1/generative-session/{session['id']}", params={"name": "renamed chat"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "renamed chat"
    assert ui.patch(f"/v1/generative-session/{session['id']}", params={"name": "chat_1"}).status_code == 409
    assert ui.patch(f"/v1/generative-session/{session['id']}", params={"model_name": "sdxl"}).status_code == 400

    assert ui.delete(f"/v1/generative-process/{process['id']}").status_code == 204
    assert not (images / image["data"]).exists()
    kept = ui.get(f"/v1/generative-process/session/{session['id']}").json()
    assert len(kept) == 1 and (images / kept[0]["output"][0]["data"]).exists()
    assert ui.delete(f"/v1/generative-session/{session['id']}").status_code == 204
    assert not (images / kept[0]["output"][0]["data"]).exists(), "a deleted session's images are removed"
    assert ui.get(f"/v1/generative-session/{session['id']}").status_code == 404

    others = [create_session_as_the_ui_does(ui, f"bulk-{i}", model)["id"] for i in range(2)]
    assert ui.request("DELETE", "/v1/generative-session/", json={"ids": others}).status_code == 204
    assert not {s["id"] for s in ui.get("/v1/generative-session").json()} & set(others)


def test_jobs_are_confirmed_once_and_other_job_types_refused(ui):
    model = ui.get("/v1/component/", params={"related_component": TASK}).json()[0]
    session = create_session_as_the_ui_does(ui, "jobs", model)
    process = ask(ui, session["id"], "a yellow triangle")
    again = ui.post("/v1/job/", files={"job_type": (None, "GenerativeJob"),
                                       "kwargs": (None, json.dumps({"generative_process_id": process["id"]}))})
    assert again.status_code == 201 and again.json()["status"] == "finished"
    assert len(ui.get(f"/v1/generative-process/session/{session['id']}").json()) == 1
    assert len(ui.get(f"/v1/generative-process/{process['id']}").json()["output"]) == 1, "generated once"

    other = ui.post("/v1/job/", files={"job_type": (None, "ModelJob"), "kwargs": (None, "{}")})
    assert other.status_code == 400 and "GenerativeJob" in other.json()["detail"]
    missing = ui.post("/v1/job/", files={"job_type": (None, "GenerativeJob"),
                                         "kwargs": (None, json.dumps({"generative_process_id": 999_999}))})
    assert missing.status_code == 404
    assert ui.get("/v1/job/999999").status_code == 404
    assert ui.get("/v1/generative-process/file/missing.png").status_code == 404


def test_a_session_may_carry_keys_the_server_does_not_know(ui):
    """DashAI ignores unknown keys; known ones are still checked."""
    body = {"name": "extra", "task_name": TASK, "parameters": {"memory_mode": "auto", "seed": 5}, "color": "x"}
    created = ui.post("/v1/generative-session/", json=body)
    assert created.status_code == 201 and "memory_mode" not in created.json()["parameters"]
    wrong = ui.post("/v1/generative-session/", json={**body, "name": "wrong", "parameters": {"seed": "five"}})
    assert wrong.status_code == 422 and wrong.json()["field"] == "seed"


def test_browsers_preflight_from_the_allowed_origin_only(dashai_server):
    preflight = {"Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"}
    allowed = httpx.options(f"{dashai_server.url}/api/v1/generative-session/1/parameters",
                            headers={"Origin": FRONT_END, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == FRONT_END
    other = httpx.options(f"{dashai_server.url}/api/v1/generative-session/1/parameters",
                          headers={"Origin": "http://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_dashais_front_end_is_served_at_app_with_its_root_assets(dashai_server):
    built = build_folder()
    assert built is not None, "make install installs the dashai package (its built front end)"
    with httpx.Client(base_url=dashai_server.url, timeout=60) as http:
        assert http.get("/app").headers["location"] == "/app/"
        for path in ("/app/", "/app/generative/sessions/12"):  # React Router owns every path under /app/
            page = http.get(path)
            assert page.status_code == 200 and page.text == (built / "index.html").read_text()
            assert page.headers["cache-control"] == "no-cache"
        script = next((built / "static" / "js").glob("main.*.js"))
        assert f'src="/static/js/{script.name}"' in page.text
        asset = http.get(f"/static/js/{script.name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
        assert http.get("/manifest.json").json()["short_name"]
        assert http.get("/static/js/none.js").status_code == 404
        assert http.get("/not-dashais.txt").status_code == 404, "nothing else is served at the root"


def test_a_dashai_user_walks_the_generative_chat_in_a_real_browser(browser, dashai_server):
    """Open, Generative, new session, task and model, create, prompt, picture, UPDATE (a seed and the shipped
    ring adapter in the `loras` text field), second prompt, rename, delete: no error toast, no field in red at
    any step, no console error but DashAI's own (tests/dashai_walk.py)."""
    walk = walk_generative_chat(browser, f"{dashai_server.url}/app/", task="Text to Image", model="shapes-64",
                                screenshots=SCREENSHOTS / "dashai-app", parameters=(("seed", "42"), ("loras", "ring:1")))
    assert walk.problems == []
    assert walk.session_before_delete["parameters"]["loras"] == "ring:1", "stored as the panel sent it"
    assert walk.session_before_delete["parameters"]["seed"] == 42
    deleted = httpx.get(f"{dashai_server.url}/api/v1/generative-session/{walk.session_id}", timeout=60)
    assert deleted.status_code == 404, "deleted through the UI"


@pytest.mark.parametrize(("installed", "enabled", "says"), [
    (False, True, "not installed on this server: install the dashai package"),
    (True, False, "turned off on this server (serving.dashai_front_end)"),
])
def test_without_dashais_front_end_app_is_a_404_that_says_why(monkeypatch, tmp_path, installed, enabled, says):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from t2i_task.api import dashai_front_end
    from t2i_task.api.errors import install_error_handlers

    (tmp_path / "index.html").write_text("<html></html>")
    monkeypatch.setattr(dashai_front_end, "build_folder", lambda: tmp_path if installed else None)
    app = FastAPI()
    front_end = dashai_front_end.DashAIFrontEnd(enabled)
    front_end.install(app)
    install_error_handlers(app)
    answer = TestClient(app).get("/app/generative")
    assert answer.status_code == 404 and says in answer.json()["detail"]
    assert not front_end.is_public("/app/generative"), "no page to load: the API keys guard it like any path"
