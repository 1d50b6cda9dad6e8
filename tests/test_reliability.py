"""Reliability and security, each proved on the real server: crashes, drains, faults, keys, limits."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from t2i_task.local_server import start_server, write_config
from tests.gate import Gate, wait_for, wait_until_queued_at_model

TASK = "TextToImageGenerationTask"


def create_session(http: httpx.Client, name: str, **parameters) -> int:
    response = http.post("/api/v1/generative-session/", json={"task_name": TASK, "name": name, "parameters": parameters})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def create_processes(http: httpx.Client, session_id: int, count: int) -> list[int]:
    ids = []
    for i in range(count):
        response = http.post("/api/v1/generative-process/", json={"session_id": session_id, "input": [f"prompt {i}"]})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def statuses(http: httpx.Client, ids: list[int]) -> list[int]:
    return [http.get(f"/api/v1/generative-process/{i}").json()["status"] for i in ids]


def all_ended(http: httpx.Client, ids: list[int]) -> list[int] | None:
    now = statuses(http, ids)
    return now if all(status in (3, 4) for status in now) else None


def stored_statuses(database: str, ids: list[int]) -> list[str]:
    with sqlite3.connect(database) as connection:
        rows = dict(connection.execute("SELECT id, status FROM generative_process").fetchall())
    return [rows[i] for i in ids]


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def start_generating(config, gate: Gate, env: dict, name: str, count: int):
    """A server, a session and `count` processes, returned while the gate holds their generation."""
    server = start_server(config, env=gate.env(**env))
    gate.close()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        ids = create_processes(http, create_session(http, name), count)
        gate.wait_until_held()
    return server, ids


def test_killed_server_resumes_its_work_on_restart_and_loses_nothing(tiny_model_path, folder):
    config = write_config(folder, tiny_model_path)
    env = {"T2I_INSTANCE_NAME": "crash-test"}
    gate = Gate(folder)
    server, ids = start_generating(config, gate, env, "crash", 6)
    orphan = folder / "images" / "left-by-nobody.png"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"not referenced")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))

    server.kill()  # SIGKILL to every process: nothing drains
    before = stored_statuses(str(folder / "t2i.db"), ids)
    assert "STARTED" in before, before

    gate.open()
    # The model now loads for longer than the API's readiness question to it waits (5 s), as a
    # large model does: the work is still taken up once it answers.
    server = start_server(config, env=gate.env(**env, T2I_TEST_LOAD_DELAY_S="8"))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ended = wait_for(lambda: all_ended(http, ids), timeout=180)
            assert ended == [3] * 6, "every interrupted process is generated after the restart"
            names = {row["data"] for i in ids for row in http.get(f"/api/v1/generative-process/{i}").json()["output"]}
        assert not orphan.exists(), "files no process names are removed at start"
        assert {p.name for p in (folder / "images").glob("*.png")} == names, "no orphan and no missing image"
        with sqlite3.connect(folder / "t2i.db") as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        server.stop()


def test_sigterm_stops_a_server_that_was_probed_while_its_model_loaded(tiny_model_path, folder):
    # BentoML's /readyz raises while the model service is still loading; unanswered, each such
    # probe lived until the request timeout and uvicorn waited for it on SIGTERM.
    # start_server probes every 0.3 s, each giving up after 2 s.
    server = start_server(write_config(folder, tiny_model_path), env=Gate(folder).env(T2I_TEST_LOAD_DELAY_S="8"))
    assert server.stop(timeout=30) == 0, "stopped by SIGTERM, not killed after the timeout"


def test_a_process_interrupted_too_often_is_given_up_with_a_reason(tiny_model_path, folder):
    config = write_config(folder, tiny_model_path, serving={"max_attempts": 1})
    env = {"T2I_INSTANCE_NAME": "give-up-test"}
    gate = Gate(folder)
    server, [process_id] = start_generating(config, gate, env, "give-up", 1)
    server.kill()

    gate.open()
    server = start_server(config, env=gate.env(**env))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            # Interrupted work is taken up in the background once the model answers, just after /readyz.
            wait_for(lambda: statuses(http, [process_id]) != [2], what="the interrupted process taken up")
            process = http.get(f"/api/v1/generative-process/{process_id}").json()
        assert process["status"] == 4
        assert process["output"][0]["data"].startswith("Error details: interrupted 1 times while generating")
    finally:
        server.stop()


def test_sigterm_drains_running_generations_before_exit(tiny_model_path, folder):
    config = write_config(folder, tiny_model_path, serving={"drain_timeout_s": 120})
    env = {"T2I_INSTANCE_NAME": "drain-test"}
    gate = Gate(folder)
    server, ids = start_generating(config, gate, env, "drain", 4)
    server.process.send_signal(signal.SIGTERM)  # to the server, as an orchestrator sends it
    wait_for(lambda: "draining:" in server.log.read_text(), what="the server draining")
    gate.open()  # the held generation runs on while the server drains
    server.process.wait(timeout=150)

    after = stored_statuses(str(folder / "t2i.db"), ids)
    assert set(after) <= {"FINISHED", "DELIVERED"}, f"finished or back in the queue, never lost: {after}"
    assert "FINISHED" in after, "the running generation finished during the drain"

    server = start_server(config, env=env)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            wait_for(lambda: statuses(http, ids) == [3] * 4)
    finally:
        server.stop()


def test_api_keys_guard_every_route_but_the_probes_and_never_reach_the_log(tiny_model_path, folder):
    key = "sk-test-4f1e9c0d2b"
    page = "http://localhost:3000"  # a browser page on another origin
    server = start_server(write_config(folder, tiny_model_path),
                          env={"T2I_API_KEYS": f"{key},second-key", "T2I_CORS_ORIGINS": page})
    try:
        # A browser's preflight carries no key: it is answered; the call itself still needs one.
        preflight = httpx.options(server.url + "/api/v1/generative-session/", headers={
            "Origin": page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == page
        assert httpx.get(server.url + "/api/v1/generative-session/", headers={"Origin": page}).status_code == 401
        for path in ("/v1/models", "/api/v1/task/metadata", "/metrics", "/docs.json", "/api/v1/generative-session/"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
                response = httpx.get(server.url + path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer" and response.json()
        for path in ("/livez", "/readyz"):
            assert httpx.get(server.url + path).status_code == 200
        # DashAI's front end loads without a key (a page and its assets cannot send one); its API calls need one.
        for path in ("/app/", "/app/generative", "/manifest.json"):
            assert httpx.get(server.url + path).status_code == 200, path
        # So do this server's page and the API reference (t2i_task/api/page.py).
        for path in ("/", "/ui/js/app.js", "/docs", "/docs/assets/swagger-ui.css", "/openapi.json"):
            assert httpx.get(server.url + path).status_code == 200, path
        for path in ("/application", "/manifest.json/x", "/static", "/uix", "/docsx"):
            assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        assert client.images.generate(prompt="a secret prompt", size="64x64", response_format="b64_json").data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.stop()
    log = server.log.read_text()
    assert key not in log and "second-key" not in log
    assert "a secret prompt" not in log, "prompts are not logged at info level"


def test_request_bodies_over_the_limit_get_413(server):
    huge = {"prompt": "x" * 1_000_000}
    response = httpx.post(f"{server.url}/v1/images/generations", json=huge)
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b"x" * 10_000

    response = httpx.post(f"{server.url}/api/v1/generative-process/", content=chunks(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a cat", "guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": "a cat", "guidance_scale": -3}, "guidance_scale"),
        ({"prompt": "a cat", "n": 10**9}, "n"),
        ({"prompt": "a cat", "size": "99999x99999"}, "size"),
        ({"prompt": "a cat", "size": "64x-64"}, "size"),
        ({"prompt": "nul \x00 byte"}, "prompt"),
        ({"prompt": "a cat", "colour": "red"}, "colour"),
        ({"prompt": ["not", "a", "string"]}, "prompt"),
        ({"prompt": "a cat", "seed": 2**70}, "seed"),
    ],
)
def test_bad_openai_requests_are_400_naming_the_field(server, body, param):
    import json

    content = json.dumps(body, allow_nan=True)  # NaN is what a careless client sends
    response = httpx.post(f"{server.url}/v1/images/generations", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_rejected_requests_write_nothing(server):
    with httpx.Client(base_url=server.url) as http:
        def count() -> int:
            return sum(len(http.get(f"/api/v1/generative-process/session/{s['id']}").json())
                       for s in http.get("/api/v1/generative-session/").json())

        session_id = create_session(http, "rejections")
        before = count()
        rejected = [
            http.post("/v1/images/generations", json={"prompt": "", "size": "64x64"}),
            http.post("/v1/images/generations", json={"prompt": "a", "size": "63x64"}),
            http.post("/api/v1/generative-process/", json={"session_id": session_id, "input": ["a\x00b"]}),
            http.post("/api/v1/generative-process/", json={"session_id": session_id, "input": ["x" * 5000]}),
            http.post("/api/v1/generative-process/", json={"session_id": 2**40, "input": ["a"]}),
            http.post("/api/v1/generative-process/", content=b"\xff\xfe not utf-8",
                      headers={"content-type": "application/json"}),
            http.post("/api/v1/generative-process/", content=b"plain text", headers={"content-type": "text/plain"}),
            http.get(f"/api/v1/generative-process/{2**40}"),
            http.delete("/api/v1/generative-process/999999"),
        ]
        assert [r.status_code for r in rejected] == [400, 400, 422, 422, 422, 400, 400, 422, 404]
        assert all(r.json() for r in rejected)
        assert count() == before


def test_an_unwritable_images_folder_fails_the_process_with_a_reason_and_the_server_carries_on(
    tiny_model_path, folder
):
    blocker = folder / "not-a-folder"
    blocker.write_text("a file where the images folder should be")
    config = write_config(folder, tiny_model_path)
    config.write_text(config.read_text().replace(str(folder / "images"), str(blocker / "images")))
    server = start_server(config)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            [process_id] = create_processes(http, create_session(http, "unwritable"), 1)
            wait_for(lambda: statuses(http, [process_id]) == [4])
            reason = http.get(f"/api/v1/generative-process/{process_id}").json()["output"][0]["data"]
            assert reason.startswith("Error details: ") and "Not a directory" in reason
            response = http.post("/v1/images/generations", json={"prompt": "still here", "size": "64x64"})
            assert response.status_code == 500 and "Not a directory" in response.json()["error"]["message"]
            assert http.get("/livez").status_code == 200
    finally:
        server.stop()


def test_out_of_memory_fails_only_the_request_that_causes_it(tiny_model_path, folder):
    # The hooks make the pipeline run out of memory on any call with "poison" in a prompt.
    gate = Gate(folder)
    server = start_server(write_config(folder, tiny_model_path), env=gate.env(T2I_TEST_POISON="poison"))
    try:
        def generate(prompt):
            return httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                              json={"prompt": prompt, "size": "64x64", "response_format": "b64_json"})

        prompts = [f"fine {i}" if i != 5 else "poison" for i in range(12)]
        with ThreadPoolExecutor(12) as pool, gate.closed():
            # The first request holds the pipeline; the other eleven, the poisoned one among
            # them, queue behind it, so the poisoned one shares a batch with its neighbours.
            first = pool.submit(generate, prompts[0])
            gate.wait_until_held()
            rest = [pool.submit(generate, prompt) for prompt in prompts[1:]]
            wait_until_queued_at_model(server.url, 12)
        answers = [first.result(), *(future.result() for future in rest)]
        codes = [a.status_code for a in answers]
        assert codes[5] == 500 and "out of memory" in answers[5].json()["error"]["message"]
        assert codes[:5] + codes[6:] == [200] * 11, [(c, a.text[:160]) for c, a in zip(codes, answers) if c != 200]
        assert generate("fine again").status_code == 200
    finally:
        server.stop()
    assert "running them one at a time" in server.log.read_text()


def test_overload_is_refused_early_with_retry_after_and_livez_stays_up(tiny_model_path, folder):
    gate = Gate(folder)
    server = start_server(write_config(folder, tiny_model_path, serving={"max_queued_generations": 4}),
                          env=gate.env())
    try:
        def generate(i):
            return httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={"prompt": f"p{i}"})

        with ThreadPoolExecutor(24) as pool, gate.closed():
            answers = [pool.submit(generate, i) for i in range(24)]
            # Four are admitted and held in the pipeline; the other twenty are answered at once.
            wait_for(lambda: sum(answer.done() for answer in answers) == 20, what="20 answers")
            refused = [answer.result() for answer in answers if answer.done()]
            assert [a.status_code for a in refused] == [429] * 20
            assert all(a.headers["retry-after"] == "5" and "busy" in a.json()["error"]["message"] for a in refused)
            assert httpx.get(f"{server.url}/livez", timeout=30).status_code == 200
            assert sum(answer.done() for answer in answers) == 20, "livez answered while the server was full"
        assert sorted(answer.result().status_code for answer in answers) == [200] * 4 + [429] * 20
    finally:
        server.stop()


class TcpProxy:
    """A loopback TCP relay to PostgreSQL that the test can cut and restore, like a network outage."""

    def __init__(self, target_port: int) -> None:
        import threading

        from t2i_task.local_server import free_port

        self.target_port, self.port = target_port, free_port()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.connections: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.restore()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _relay(self, reader, writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections |= {writer, upstream_writer}

        async def pipe(source, sink):
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def restore(self) -> None:
        async def listen():
            self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self._run(listen())

    def cut(self) -> None:
        async def close():
            self.server.close()
            for writer in list(self.connections):
                writer.transport.abort()  # established connections die too
            self.connections.clear()
        self._run(close())


def test_database_outage_answers_503_and_recovers_by_itself(tiny_model_path, folder, postgres_url):
    proxy = TcpProxy(5432)
    database_url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    server = start_server(write_config(folder, tiny_model_path), env={"T2I_DATABASE_URL": database_url})
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            session_id = create_session(http, "outage")
            proxy.cut()
            for call in (lambda: http.get(f"/api/v1/generative-session/{session_id}"),
                         lambda: http.post("/api/v1/generative-process/",
                                           json={"session_id": session_id, "input": ["during the outage"]})):
                # The client gives up after 60 s, the server's own timeout is 600 s: an
                # answer at all shows the server did not wait on the database.
                response = call()
                assert response.status_code == 503
                assert response.json()["detail"] == "Database unavailable; retry later."
                assert response.headers["retry-after"]
            assert http.get("/livez").status_code == 200

            proxy.restore()
            assert http.get(f"/api/v1/generative-session/{session_id}").status_code == 200
            [process_id] = create_processes(http, session_id, 1)
            wait_for(lambda: statuses(http, [process_id]) == [3])
            assert http.get(f"/api/v1/generative-process/session/{session_id}").json()[0]["id"] == process_id
    finally:
        server.stop()


def test_two_replicas_share_one_postgresql_and_one_images_folder(tiny_model_path, folder, postgres_url):
    config = write_config(folder, tiny_model_path)
    replicas = [start_server(config, env={"T2I_DATABASE_URL": postgres_url, "T2I_INSTANCE_NAME": name},
                             log_name=f"{name}.log") for name in ("replica-a", "replica-b")]
    a, b = (httpx.Client(base_url=replica.url, timeout=60) for replica in replicas)
    try:
        session_id = create_session(a, "shared")
        assert b.get(f"/api/v1/generative-session/{session_id}").json()["name"] == "shared"

        [process_id] = create_processes(a, session_id, 1)
        wait_for(lambda: statuses(b, [process_id]) == [3])
        image = b.get(f"/api/v1/generative-process/{process_id}").json()["output"][0]["data"]
        assert a.get(f"/api/v1/generative-process/image/{image}").headers["content-type"] == "image/png"
        assert b.delete(f"/api/v1/generative-process/{process_id}").status_code == 204
        assert a.get(f"/api/v1/generative-process/{process_id}").status_code == 404
        assert not (folder / "images" / image).exists()

        with ThreadPoolExecutor(8) as pool:
            created = list(pool.map(
                lambda i: (a if i % 2 else b).post("/api/v1/generative-process/",
                                                   json={"session_id": session_id, "input": [f"both {i}"]}),
                range(40),
            ))
        ids = [response.json()["id"] for response in created]
        assert all(response.status_code == 201 for response in created) and len(set(ids)) == 40
        wait_for(lambda: all_ended(a, ids), timeout=180)
        listed = b.get(f"/api/v1/generative-process/session/{session_id}").json()
        assert sorted(p["id"] for p in listed) == sorted(ids) and {p["status"] for p in listed} == {3}
        assert sorted(p["input"][0]["data"] for p in listed) == sorted(f"both {i}" for i in range(40))
    finally:
        a.close(), b.close()
        for replica in replicas:
            replica.stop()


def test_the_batchers_own_refusal_reaches_clients_as_json_503(tiny_model_path, folder):
    # A latency budget of 1 ms: BentoML's batcher refuses whatever queues behind a running batch.
    # With a cost figure the scheduler would never let work queue there (nor accept any:
    # nothing finishes in 1 ms); an uncalibrated model is handed work by count only.
    gate = Gate(folder)
    # Two calls in flight, so that one queues at BentoML's batcher behind the running one (as
    # calls from several API workers, or from other clients of the model service, would).
    config = write_config(folder, tiny_model_path, batching={"max_latency_ms": 1, "calls_in_flight": 2},
                          model={"cost": None})
    server = start_server(config, env=gate.env())
    try:
        def generate(i):
            return httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={"prompt": f"p{i}"})

        # BentoML's batcher first times about a dozen calls to learn its latency model, and while
        # it does it refuses a call only when more wait than it needs: one call carrying many
        # requests (t2i_task/jobs/model_calls.py) would just wait. Past that it refuses at once.
        # With a 1 ms budget it may refuse some of these lone calls too: either answer will do.
        for i in range(12):
            assert generate(100 + i).status_code in (200, 503)
        with ThreadPoolExecutor(16) as pool, gate.closed():
            first = pool.submit(generate, 0)
            gate.wait_until_held()
            rest = [pool.submit(generate, i) for i in range(1, 16)]
            wait_for(lambda: any(a.done() and a.result().status_code == 503 for a in rest), what="a 503")
        answers = [first.result(), *(future.result() for future in rest)]
        codes = [a.status_code for a in answers]
        assert codes[0] == 200 and set(codes) == {200, 503}, codes
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.json()["error"]["type"] == "server_error" and a.headers["retry-after"] for a in refused)
    finally:
        server.stop()
