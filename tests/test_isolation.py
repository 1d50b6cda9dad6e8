"""Each API key sees only its own work: two users and an admin over every route of the server.

Alice makes a session, processes, an image, a file, a batch and an OpenAI call; Bob, another user,
finds none of them (404 exactly as for an id nobody has, absent from his lists) and changes none of
them; the admin sees and manages all. The route table is read from the running server's OpenAPI
schema, so a route added later without being classified here fails `test_every_route_is_classified`.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from t2i_task.api.links import SECRET_NAME, LinkSigner
from t2i_task.config.keys import key_hash
from t2i_task.local_server import start_server, write_config
from t2i_task.storage.store import Store
from tests.gate import wait_for

TASK = "TextToImageGenerationTask"
SMALL = {"num_inference_steps": 2}

# Every route of the schema, by how it treats owners. A route added without a line here fails.
OWNED = {  # answer only the caller's own objects (bob_cannot_see_or_change below calls each)
    "POST /api/v1/generative-session/", "GET /api/v1/generative-session/", "DELETE /api/v1/generative-session/",
    "GET /api/v1/generative-session/{session_id}", "PATCH /api/v1/generative-session/{session_id}",
    "DELETE /api/v1/generative-session/{session_id}", "PUT /api/v1/generative-session/{session_id}/parameters",
    "GET /api/v1/generative-session/parameters-history/{session_id}", "POST /api/v1/generative-process/",
    "GET /api/v1/generative-process/image/{filename}", "GET /api/v1/generative-process/file/{filename}",
    "GET /api/v1/generative-process/session/{session_id}", "GET /api/v1/generative-process/{process_id}",
    "DELETE /api/v1/generative-process/{process_id}", "GET /api/v1/generative-process/{process_id}/events",
    "POST /api/v1/generative-process/{process_id}/cancel", "POST /api/v1/job/", "GET /api/v1/job/",
    "GET /api/v1/job/changes", "DELETE /api/v1/job/all", "DELETE /api/v1/job/{job_id}", "GET /api/v1/job/{job_id}",
    "POST /v1/images/generations", "POST /v1/files", "GET /v1/files", "GET /v1/files/{file_id}",
    "DELETE /v1/files/{file_id}", "GET /v1/files/{file_id}/content", "POST /v1/batches", "GET /v1/batches",
    "GET /v1/batches/{batch_id}", "POST /v1/batches/{batch_id}/cancel", "GET /v1/batches/{batch_id}/images",
    "GET /v1/usage",
}
SHARED = {  # the server's own description: the same for every key
    "GET /api/v1/task/metadata", "GET /api/v1/component/", "GET /api/v1/component/{name}/download",
    "POST /api/v1/component/downloads/required", "GET /api/v1/component/{name}/", "GET /v1/models",
    "GET /v1/models/{name}", "GET /api/v1/model-session/", "GET /api/v1/dataset/", "GET /api/v1/folder/",
    "GET /api/v1/credential/", "GET /api/v1/experiment/", "GET /api/v1/run/", "GET /api/v1/explainer/",
    "GET /api/v1/explorer/", "GET /api/v1/pipeline/", "GET /api/v1/notebook/", "GET /api/v1/plugin/",
}


KEYS_ENV = {"T2I_API_KEYS": "alice:alice-key,bob:bob-key"}


@pytest.fixture(scope="module")
def keyed(server_folder, gate):
    keys_file = server_folder / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"name": "ops", "sha256": key_hash("ops-key"), "role": "admin"}]}))
    serving = {"api_keys_file": str(keys_file), "max_queued_per_key": 2}
    server = start_server(write_config(server_folder, serving=serving), env=gate.env(**KEYS_ENV))
    yield server
    server.stop()


def client(server, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def alice(keyed):
    with client(keyed, "alice-key") as http:
        yield http


@pytest.fixture(scope="module")
def bob(keyed):
    with client(keyed, "bob-key") as http:
        yield http


@pytest.fixture(scope="module")
def admin(keyed):
    with client(keyed, "ops-key") as http:
        yield http


def ended(http: httpx.Client, process_id: int) -> dict:
    return wait_for(lambda: (p := http.get(f"/api/v1/generative-process/{process_id}").json())["status"] in (3, 4)
                    and p, what=f"process {process_id} ended")


@pytest.fixture(scope="module")
def alices(alice):
    """Alice's objects: a session with a finished process and its image, a file, a finished batch, and an
    OpenAI call's image."""
    session = alice.post("/api/v1/generative-session/", json={"name": "mine", "task_name": TASK,
                                                              "parameters": SMALL}).json()
    process = alice.post("/api/v1/generative-process/", json={"session_id": session["id"],
                                                              "input": ["a red circle on a blue background"]}).json()
    process = ended(alice, process["id"])
    line = {"custom_id": "a", "method": "POST", "url": "/v1/images/generations",
            "body": {"prompt": "a green square", **SMALL}}
    uploaded = alice.post("/v1/files", data={"purpose": "batch"},
                          files={"file": ("lines.jsonl", json.dumps(line) + "\n")}).json()
    batch = alice.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/images/generations",
                                            "completion_window": "24h"}).json()
    wait_for(lambda: alice.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed", what="batch done")
    openai_call = alice.post("/v1/images/generations", json={"prompt": "a yellow triangle", "response_format": "url",
                                                             **SMALL})
    assert openai_call.status_code == 200, openai_call.text
    return {"session": session, "process": process, "image": process["output"][0]["data"], "file": uploaded,
            "batch": alice.get(f"/v1/batches/{batch['id']}").json(),
            "openai_image": openai_call.json()["data"][0]["url"].split("?")[0].rsplit("/", 1)[1]}


def test_every_route_is_classified(keyed):
    schema = httpx.get(f"{keyed.url}/openapi.json", timeout=30).json()
    routes = {f"{method.upper()} {path}" for path, operations in schema["paths"].items() for method in operations}
    unclassified = routes - OWNED - SHARED
    assert not unclassified, f"routes that say nothing about owners (add each to OWNED and test it): {unclassified}"
    assert not (OWNED | SHARED) - routes, "routes listed here that the server no longer has"


def test_bob_finds_none_of_alices_objects(alice, bob, alices):
    session, process, image = alices["session"], alices["process"], alices["image"]
    theirs = {"session": session["id"], "process": process["id"], "image": image, "file": alices["file"]["id"],
              "batch": alices["batch"]["id"], "output": alices["batch"]["output_file_id"]}
    nobodys = {"session": 999999, "process": 999999, "image": "0" * 32 + ".png", "file": "file-" + "0" * 32,
               "batch": "batch_" + "0" * 32, "output": "file-" + "1" * 32}
    for template in ("/api/v1/generative-session/{session}", "/api/v1/generative-session/parameters-history/{session}",
                     "/api/v1/generative-process/session/{session}", "/api/v1/generative-process/{process}",
                     "/api/v1/generative-process/{process}/events", "/api/v1/generative-process/file/{image}",
                     "/api/v1/generative-process/image/{image}", "/api/v1/job/{process}", "/v1/files/{file}",
                     "/v1/files/{file}/content", "/v1/batches/{batch}", "/v1/batches/{batch}/images",
                     "/v1/files/{output}"):
        answer, missing = bob.get(template.format(**theirs)), bob.get(template.format(**nobodys))
        assert answer.status_code == missing.status_code == 404, (template, answer.status_code, missing.status_code)
        assert set(answer.json()) == set(missing.json()), "the same answer as for an object nobody has"
    assert bob.get(f"/api/v1/generative-process/file/{alices['openai_image']}").status_code == 404
    assert bob.get("/api/v1/generative-session/").json() == []
    assert bob.get("/api/v1/job/").json() == []
    assert bob.get("/api/v1/job/changes").json()["jobs"] == []
    assert bob.get("/v1/files").json()["data"] == []
    assert bob.get("/v1/batches").json()["data"] == []
    assert bob.post("/api/v1/job/", json={"job_type": "GenerativeJob",
                                          "kwargs": {"generative_process_id": process["id"]}}).status_code == 404
    assert bob.post("/api/v1/generative-process/", json={"session_id": session["id"],
                                                         "input": ["into alice's session"]}).status_code == 404
    file_batch = bob.post("/v1/batches", json={"input_file_id": alices["file"]["id"],
                                               "endpoint": "/v1/images/generations", "completion_window": "24h"})
    assert file_batch.status_code == 404
    # Names are per owner: Bob may use the name Alice's session has, and learns nothing from it.
    assert bob.post("/api/v1/generative-session/", json={"name": "mine", "task_name": TASK}).status_code == 201
    assert [s["name"] for s in alice.get("/api/v1/generative-session/").json()].count("mine") == 1


def test_bob_changes_nothing_of_alices(alice, bob, alices, gate):
    session, process = alices["session"], alices["process"]
    before = alice.get(f"/api/v1/generative-session/{session['id']}").json()
    assert bob.patch(f"/api/v1/generative-session/{session['id']}", params={"name": "taken"}).status_code == 404
    assert bob.put(f"/api/v1/generative-session/{session['id']}/parameters", json={"seed": 5}).status_code == 404
    assert bob.request("DELETE", "/api/v1/generative-session/", json={"ids": [session["id"]]}).status_code == 404
    assert bob.delete(f"/api/v1/generative-session/{session['id']}").status_code == 404
    assert bob.delete(f"/api/v1/generative-process/{process['id']}").status_code == 404
    assert bob.delete(f"/v1/files/{alices['file']['id']}").status_code == 404
    assert alice.get(f"/api/v1/generative-session/{session['id']}").json() == before
    assert alice.get(f"/api/v1/generative-process/{process['id']}").status_code == 200
    assert alice.get(f"/v1/files/{alices['file']['id']}").status_code == 200

    with gate.closed():  # a running process of Alice's: Bob can neither cancel nor delete it
        running = alice.post("/api/v1/generative-process/", json={"session_id": session["id"],
                                                                  "input": ["a white circle"]}).json()
        gate.wait_until_held()
        assert bob.post(f"/api/v1/generative-process/{running['id']}/cancel").status_code == 404
        assert bob.delete(f"/api/v1/job/{running['id']}").status_code == 404
        assert bob.delete("/api/v1/job/all").json() == {"cancelled": 0}
        assert bob.delete(f"/api/v1/generative-process/{running['id']}").status_code == 404
        assert bob.post(f"/v1/batches/{alices['batch']['id']}/cancel").status_code == 404
    assert ended(alice, running["id"])["status"] == 3, "finished as if Bob had done nothing"


def test_a_key_past_its_share_gets_429_and_the_other_keys_go_on(alice, bob, alices, gate):
    """serving.max_queued_per_key is 2 here: Alice's third queued generation is refused with Retry-After,
    Bob's first is taken."""
    session = alices["session"]
    bobs = bob.post("/api/v1/generative-session/", json={"name": "bob's", "task_name": TASK, "parameters": SMALL})
    with gate.closed():
        held = [alice.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": [f"job {n}"]})
                for n in range(2)]
        assert [answer.status_code for answer in held] == [201, 201]
        refused = alice.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["job 3"]})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "max_queued_per_key" in refused.json()["detail"]
        openai_refused = alice.post("/v1/images/generations", json={"prompt": "one more", **SMALL})
        assert openai_refused.status_code == 429 and openai_refused.json()["error"]["message"]
        taken = bob.post("/api/v1/generative-process/", json={"session_id": bobs.json()["id"], "input": ["bob's"]})
        assert taken.status_code == 201
    for process in [*held, taken]:
        assert ended(alice if process is not taken else bob, process.json()["id"])["status"] == 3


def test_usage_is_counted_per_key_and_each_key_reads_its_own(keyed, alice, bob, admin, alices):
    """GET /v1/usage: images and model-seconds of the caller's key (an admin's: every key's), the same
    figures as the Prometheus gauges labelled by key name."""
    mine = alice.get("/v1/usage").json()["data"]
    assert [line["key"] for line in mine] == ["alice"]
    assert mine[0]["images"] >= 3 and mine[0]["model_seconds"] > 0  # a process, a batch line, two OpenAI calls
    assert [line["key"] for line in bob.get("/v1/usage").json()["data"]] == ["bob"]
    everyone = {line["key"]: line for line in admin.get("/v1/usage").json()["data"]}
    assert everyone["alice"]["images"] == mine[0]["images"] and "bob" in everyone

    def reported() -> bool:
        text = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": "Bearer ops-key"}, timeout=30).text
        return f't2i_key_images{{key="alice"}} {float(mine[0]["images"])}' in text
    wait_for(reported, timeout=30, interval=0.5, what="alice's images on /metrics")


def test_the_admin_sees_and_manages_everyone(admin, alices):
    session, process = alices["session"], alices["process"]
    assert admin.get(f"/api/v1/generative-session/{session['id']}").status_code == 200
    assert session["id"] in [s["id"] for s in admin.get("/api/v1/generative-session/").json()]
    assert admin.get(f"/api/v1/generative-process/file/{alices['image']}").status_code == 200
    assert admin.get(f"/v1/batches/{alices['batch']['id']}").status_code == 200
    assert alices["file"]["id"] in [f["id"] for f in admin.get("/v1/files").json()["data"]]
    assert admin.delete(f"/api/v1/generative-process/{process['id']}").status_code == 204


def test_a_signed_link_loads_in_a_browser_with_no_header_and_an_altered_or_expired_one_is_refused(
        keyed, alice, alices, browser):
    """OpenAI's `url` answers carry a signature while keys are on: the link loads as an `<img>` in Chromium
    with no header; changing its path, owner, expiry or signature, or letting it expire, gives 403."""
    answer = alice.post("/v1/images/generations", json={"prompt": "a blue circle", "response_format": "url", **SMALL})
    link = answer.json()["data"][0]["url"]
    assert "signature=" in link and "owner=alice" in link
    assert httpx.get(link, timeout=30).status_code == 200
    assert httpx.get(link.split("?")[0], timeout=30).status_code == 401, "the same path without its signature"

    page = browser.new_page()
    try:
        page.set_content(f'<img id="picture" src="{link}">')
        page.wait_for_function("document.getElementById('picture').complete")
        assert page.evaluate("document.getElementById('picture').naturalWidth") == 64
    finally:
        page.close()

    query = dict(part.split("=", 1) for part in link.split("?")[1].split("&"))
    path = link.split("?")[0]
    altered = [path.replace("/image/", "/file/") + "?" + link.split("?")[1],
               link.replace("owner=alice", "owner=bob"),
               link.replace(f"expires={query['expires']}", f"expires={int(query['expires']) + 3600}"),
               link.replace(query["signature"], query["signature"][::-1])]
    for url in altered:
        refused = httpx.get(url, timeout=30)
        assert refused.status_code == 403 and "not valid" in refused.json()["detail"], url

    secret = Store(f"sqlite:///{keyed.config.parent / 't2i.db'}", keyed.config.parent / "images").shared_secret(
        SECRET_NAME)
    image_path = "/api/v1/generative-process/image/" + alices["openai_image"]
    expired = LinkSigner(secret, lifetime_s=60).link(keyed.url, image_path, "alice", now=time.time() - 120)
    refused = httpx.get(expired, timeout=30)
    assert refused.status_code == 403 and "expired" in refused.json()["detail"]
    fresh = LinkSigner(secret, lifetime_s=60).link(keyed.url, image_path, "alice")
    assert httpx.get(fresh, timeout=30).status_code == 200, "the server's own secret, from its database"


def test_links_made_before_a_restart_still_load_after_it(keyed, alice, gate):
    answer = alice.post("/v1/images/generations", json={"prompt": "a red square", "response_format": "url", **SMALL})
    link = answer.json()["data"][0]["url"]
    keyed.stop()
    restarted = start_server(keyed.config, env=gate.env(**KEYS_ENV))
    try:
        assert httpx.get(link.replace(keyed.url, restarted.url), timeout=30).status_code == 200
    finally:
        restarted.stop()
