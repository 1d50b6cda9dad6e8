"""Images on S3-compatible object storage, against a real S3 server (moto's server mode) the test starts.

Two servers share one database and one bucket, as two replicas on two machines
would: what one writes, the other serves.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from t2i_task.local_server import start_s3_server, start_server, write_config
from t2i_task.storage.files import ImageFiles
from tests.test_service import TASK, wait_until_ended

BUCKET = "t2i-images"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, with a bucket; the AWS environment a client needs to reach it."""
    server, environment = start_s3_server(tmp_path_factory.mktemp("moto") / "moto.log", BUCKET)
    yield environment
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="module")
def replicas(tiny_model_path, tmp_path_factory, s3):
    """Two servers on one SQLite database and one bucket."""
    shared = tmp_path_factory.mktemp("shared")
    servers = []
    for name in ("replica-a", "replica-b"):
        config = write_config(tmp_path_factory.mktemp(name), tiny_model_path)
        config.write_text(config.read_text().replace(str(config.parent / "t2i.db"), str(shared / "t2i.db")))
        env = {**s3, "T2I_IMAGES_DIR": f"s3://{BUCKET}/images", "T2I_INSTANCE_NAME": name}
        servers.append(start_server(config, env=env))
    yield servers
    for server in servers:
        server.stop()


def bucket_names(s3, monkeypatch) -> set[str]:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    return {name for name in ImageFiles(f"s3://{BUCKET}/images").older_than(-60)}


def test_an_image_one_replica_writes_is_served_by_the_other_and_leaves_no_local_file(replicas, s3, monkeypatch):
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=120) as first, httpx.Client(base_url=b.url, timeout=120) as second:
        made = first.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64",
                                                          "response_format": "b64_json", "seed": 3})
        assert made.status_code == 200, made.text
        png = base64.b64decode(made.json()["data"][0]["b64_json"])
        linked = first.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64",
                                                            "response_format": "url", "seed": 3})
        name = linked.json()["data"][0]["url"].rsplit("/", 1)[1]
        assert name in bucket_names(s3, monkeypatch)
        served = second.get(f"/api/v1/generative-process/file/{name}")
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert served.content == png  # the same seed, the same bytes, from the bucket
        assert second.get("/api/v1/generative-process/file/0000.png").status_code == 404

        # A DashAI process made on one replica, read (and inlined) on the other, deleted with its image.
        session = first.post("/api/v1/generative-session/", json={"task_name": TASK, "name": "on s3",
                                                                  "parameters": {"width": 64, "height": 64}}).json()
        process = first.post("/api/v1/generative-process/", json={"session_id": session["id"], "input": ["a cat"]})
        ended = wait_until_ended(second, process.json()["id"])
        [image] = ended["output"]
        inline = second.get(f"/api/v1/generative-process/{ended['id']}", params={"base64": "true"}).json()
        assert Image.open(io.BytesIO(base64.b64decode(inline["output"][0]["data"]))).size == (64, 64)
        assert second.delete(f"/api/v1/generative-process/{ended['id']}").status_code == 204
        assert image["data"] not in bucket_names(s3, monkeypatch)
    for server in replicas:
        assert not list((server.config.parent / "images").glob("*.png")), "no image is kept on a replica's disk"


def write_two(folder: Path) -> list[tuple[str, str]]:
    for name in ("one.png", "two.png"):
        Image.new("RGB", (8, 8), "red").save(folder / name)
    return [("one.png", "Image"), ("two.png", "Image")]


def test_a_bucket_keeps_what_the_task_writes_and_signs_links_to_it(s3, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    images = ImageFiles(f"s3://{BUCKET}/signed")
    assert not images.local and images.free_bytes() is None
    assert images.save(write_two) == [("one.png", "Image"), ("two.png", "Image")]
    link = images.signed_url("one.png", 60)
    fetched = httpx.get(link)
    assert fetched.status_code == 200 and fetched.content == images.read("one.png")
    images.delete(["one.png", "two.png", "never-there.png"])
    with pytest.raises(FileNotFoundError):
        images.read("one.png")


def test_an_upload_refused_half_way_leaves_nothing_behind(s3, monkeypatch):
    import obstore

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    images = ImageFiles(f"s3://{BUCKET}/refused")
    real_put, calls = obstore.put, []

    def refusing_put(store, name, data):  # the first goes, the second is refused (a full bucket, say)
        calls.append(name)
        if len(calls) == 2:
            raise OSError("the object store refused the upload: quota exceeded")
        return real_put(store, name, data)

    monkeypatch.setattr(obstore, "put", refusing_put)
    with pytest.raises(OSError, match="quota exceeded"):
        images.save(write_two)
    assert calls == ["one.png", "two.png"] and images.older_than(-60) == []
