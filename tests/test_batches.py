"""Bulk jobs through OpenAI's Batch API, with the stock `openai` client against the real server:
upload, create, poll, download and decode every image; bad lines in the error file; refused
files; cancel; lists; and a server killed mid-batch that finishes it with each line once."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import zipfile

import openai
import pytest
from PIL import Image

from t2i_task.local_server import start_server, write_config
from tests.gate import Gate, wait_for, wait_until_queued_at_model

ENDPOINT = "/v1/images/generations"
ENDED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module")
def server_config():
    # A small upload limit, to see it hold on the upload route alone.
    return {"bulk": {"max_file_mb": 0.25}}


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def request(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"prompt": f"a red circle {custom_id}", "num_inference_steps": 2, **body}}


def upload(client: openai.OpenAI, lines: list[dict] | bytes) -> str:
    content = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=("requests.jsonl", content), purpose="batch").id


def run_batch(client: openai.OpenAI, lines: list[dict], **extra):
    return client.batches.create(input_file_id=upload(client, lines), endpoint=ENDPOINT, completion_window="24h",
                                 **extra)


def ended(client: openai.OpenAI, batch_id: str):
    return wait_for(lambda: (batch := client.batches.retrieve(batch_id)).status in ENDED and batch,
                    interval=0.2, what=f"batch {batch_id} ended")


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    """A result file's lines by custom_id (each custom_id must appear once)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_a_batch_answers_every_line_as_a_live_request_would_and_a_bad_line_lands_in_the_error_file(client, http):
    lines = [request("plain", seed=1), request("two", n=2, seed=2), request("wide", size="64x32", seed=3),
             request("jpeg", output_format="jpeg", seed=4), request("link", response_format="url", seed=5),
             request("too-big", size="4096x4096"), request("unknown-model", model="sdxl")]
    batch = run_batch(client, lines, metadata={"project": "tests"})
    assert batch.status == "in_progress" and batch.endpoint == ENDPOINT and batch.metadata == {"project": "tests"}
    assert batch.request_counts.total == 7

    batch = ended(client, batch.id)
    assert batch.status == "completed" and batch.completed_at >= batch.in_progress_at
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 2)
    output, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert set(output) == {"plain", "two", "wide", "jpeg", "link"} and set(errors) == {"too-big", "unknown-model"}

    for custom_id, line in output.items():
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["id"].startswith("batch_req_")
    bodies = {custom_id: line["response"]["body"] for custom_id, line in output.items()}
    assert png(bodies["plain"]["data"][0]["b64_json"]).text["seed"] == "1"
    assert [png(item["b64_json"]).size for item in bodies["two"]["data"]] == [(32, 32), (32, 32)]
    assert png(bodies["wide"]["data"][0]["b64_json"]).size == (64, 32)
    assert base64.b64decode(bodies["jpeg"]["data"][0]["b64_json"])[:3] == b"\xff\xd8\xff"
    assert bodies["jpeg"]["output_format"] == "jpeg"
    linked = http.get(bodies["link"]["data"][0]["url"])
    assert linked.status_code == 200 and Image.open(io.BytesIO(linked.content)).text["seed"] == "5"

    too_big = errors["too-big"]
    assert too_big["response"]["status_code"] == 400 and too_big["error"]["code"]
    assert "2048" in too_big["error"]["message"] and too_big["response"]["body"]["error"]["param"] == "size"
    assert "sdxl" in errors["unknown-model"]["error"]["message"]

    archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/batches/{batch.id}/images").content))
    assert sorted(archive.namelist()) == ["jpeg-0.png", "link-0.png", "plain-0.png", "two-0.png", "two-1.png",
                                          "wide-0.png"]


@pytest.mark.parametrize(("content", "named"), [
    (jsonl([request("a")]) + b"not json\n", "Line 2 of the input file is not JSON"),
    (jsonl([request("a"), {**request("b"), "url": "/v1/chat/completions"}]), "Line 2 of the input file names the endpoint"),
    (jsonl([request("a"), request("b"), request("a")]), "Line 3 of the input file repeats the custom_id 'a' of line 1"),
    (jsonl([{**request("a"), "method": "GET"}]), "Line 1 of the input file has method 'GET'"),
])
def test_a_file_that_is_not_jsonl_names_another_endpoint_or_repeats_a_custom_id_is_refused_naming_the_line(
        client, content, named):
    before = client.batches.list(limit=100).data
    file_id = upload(client, content)
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    assert named in refused.value.message
    assert client.batches.list(limit=100).data == before, "nothing is stored for a refused file"


def test_a_batch_names_this_endpoint_and_a_file_uploaded_for_batches(client):
    file_id = upload(client, [request("a")])
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="1h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint=ENDPOINT, completion_window="24h")


def test_files_are_listed_retrieved_read_and_deleted_and_uploads_have_their_own_limit(client, http):
    content = jsonl([request("a"), request("b")])
    stored = client.files.create(file=("mine.jsonl", content), purpose="batch")
    assert (stored.object, stored.bytes, stored.filename, stored.purpose) == ("file", len(content), "mine.jsonl",
                                                                             "batch")
    assert client.files.retrieve(stored.id).id == stored.id
    assert client.files.content(stored.id).content == content
    assert stored.id in [f.id for f in client.files.list(purpose="batch")]

    # Larger than every other route takes (serving.max_body_bytes, 64 KiB), within bulk.max_file_mb (256 KiB).
    large = jsonl([request(f"line-{i}", prompt="x" * 900) for i in range(100)])
    assert 65_536 < len(large) < 0.25 * 2**20
    assert client.files.create(file=("large.jsonl", large), purpose="batch").bytes == len(large)
    too_large = http.post("/v1/files", files={"file": ("huge.jsonl", large * 3)}, data={"purpose": "batch"})
    assert too_large.status_code == 413 and too_large.json()["error"]["message"]
    assert http.post("/v1/images/generations", content=b"{" + b" " * 70_000 + b"}",
                     headers={"Content-Type": "application/json"}).status_code == 413, "other routes keep 64 KiB"
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", content), purpose="fine-tune")

    assert client.files.delete(stored.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(stored.id)


def test_batches_are_listed_newest_first_page_by_page(client):
    made = [run_batch(client, [request(f"page-{i}")]).id for i in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0]
    for batch_id in made:
        ended(client, batch_id)


def test_a_cancelled_batch_keeps_what_finished_and_ends_the_rest_in_the_error_file(client, server, gate):
    with gate.closed():
        batch = run_batch(client, [request(f"c-{i}") for i in range(6)])
        gate.wait_until_held()  # its first call is at the model
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = ended(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    output, errors = results(client, batch.output_file_id), results(client, batch.error_file_id)
    assert set(output) | set(errors) == {f"c-{i}" for i in range(6)} and not set(output) & set(errors)
    assert errors and all(line["error"]["code"] == "batch_cancelled" for line in errors.values())
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(output), len(errors))
    assert client.batches.cancel(batch.id).status == "cancelled", "an ended batch stays as it ended"


def test_a_server_killed_mid_batch_finishes_it_after_a_restart_with_every_line_once(tiny_model_path, tmp_path):
    """Four lines of 2 steps finish; the call of eight lines of 3 steps is held after its third step
    and the server is killed (SIGKILL): the restarted server, on the same database and images,
    runs those again and writes each custom_id exactly once."""
    gate = Gate(tmp_path)
    config = write_config(tmp_path, tiny_model_path)
    server = start_server(config, env=gate.env())
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        lines = [request(f"quick-{i}") for i in range(4)] + [request(f"slow-{i}", num_inference_steps=3)
                                                             for i in range(8)]
        with gate.holding_after_step(3) as held:
            batch = run_batch(client, lines)
            wait_for(held, what="the slow call held after its third step")
            assert client.batches.retrieve(batch.id).request_counts.completed == 4
            server.kill()
    finally:
        server.stop()
    server = start_server(config, env=gate.env(), log_name="restarted.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        batch = ended(client, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 12 and batch.error_file_id is None
        output = results(client, batch.output_file_id)
        assert list(output) == [line["custom_id"] for line in lines], "every line once, in the file's order"
    finally:
        server.stop()


def test_a_live_request_is_the_next_call_to_the_model_ahead_of_waiting_batch_lines(client, http, server, gate):
    steps_log = gate.path.with_name("gate.steps")
    steps_log.unlink(missing_ok=True)
    with gate.closed():
        batch = run_batch(client, [request(f"bulk-{i}") for i in range(12)])
        gate.wait_until_held()  # the first bulk call; the other lines wait behind it
        wait_until_queued_at_model(server.url, 12)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            live = pool.submit(http.post, "/v1/images/generations", json={
                "prompt": "live", "num_inference_steps": 2, "response_format": "b64_json"})
            wait_until_queued_at_model(server.url, 13)
            gate.open()
            assert live.result(timeout=120).status_code == 200
    ended(client, batch.id)
    first_prompts = [line.split("\t")[0] for line in steps_log.read_text().splitlines()]
    assert first_prompts[0].startswith("a red circle bulk-") and first_prompts[1] == "live", first_prompts
