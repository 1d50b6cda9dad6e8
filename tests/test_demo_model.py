"""The shipped demo model, served as `make serve` serves it, draws what its prompts say.

The judge (training/judge.py) reads each picture back; the prompts are fixed
and were not picked from the evaluation's results.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from t2i_task.config.settings import load_settings
from t2i_task.local_server import PROJECT_ROOT, start_server, write_config
from training.judge import judge
from training.shapes import Scene

QUICKSTART_PICTURE = PROJECT_ROOT / "docs" / "quickstart.png"
# (prompt, what must be seen): every colour, shape and position, phrasings of each kind, two held-out combinations.
FIXED_PROMPTS = [
    ("a red circle on a blue background", Scene("red", "circle", "blue")),
    ("yellow square, black background", Scene("yellow", "square", "black")),
    ("a picture of a white triangle on orange", Scene("white", "triangle", "orange")),
    ("purple background with a green circle", Scene("green", "circle", "purple")),
    ("a small black square on the left on a yellow background", Scene("black", "square", "yellow", "left")),
    ("orange triangle at the top, white background", Scene("orange", "triangle", "white", "top")),
    ("a large purple circle on a red background", Scene("purple", "circle", "red")),
    ("blue square at the bottom, green background", Scene("blue", "square", "green", "bottom")),
    ("a green triangle on the right on a red background", Scene("green", "triangle", "red", "right")),
    # Held out of training: the model composes words it learnt apart.
    ("a blue circle on a yellow background", Scene("blue", "circle", "yellow")),
    ("red triangle, green background", Scene("red", "triangle", "green")),
]


@pytest.mark.parametrize("folder", ["demo_model", "demo_model_64"])
def test_the_shipped_weights_are_small_safetensors(folder):
    folder = PROJECT_ROOT / folder
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".ckpt", ".pkl"}]
    assert {path.parent.name for path in files if path.suffix == ".safetensors"} - {"loras"} == {
        "unet", "vae", "text_encoder"}
    assert sum(path.stat().st_size for path in files) <= 20 * 2**20
    assert all(path.stat().st_size <= 2 * 2**20 for path in (folder / "loras").glob("*.safetensors")), "adapters"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """`configuration.yaml` as shipped (model, defaults), with its own database and images folder."""
    server = start_server(write_config(tmp_path_factory.mktemp("demo")))
    yield server
    server.stop()


@pytest.fixture
def http(demo_server):
    with httpx.Client(base_url=demo_server.url, timeout=60) as client:
        yield client


def seen(b64_png: str) -> Scene:
    return judge(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def test_the_shipped_models_are_served_and_shapes_64_is_the_default(http):
    assert load_settings().default_model.name == "shapes-64"
    models = {model["id"]: model for model in http.get("/v1/models").json()["data"]}
    assert {"shapes-32", "shapes-64"} <= models.keys()


@pytest.mark.parametrize("model, side", [("shapes-32", 32), ("shapes-64", 64)])
@pytest.mark.parametrize("prompt, wanted", FIXED_PROMPTS, ids=[prompt for prompt, _ in FIXED_PROMPTS])
def test_fixed_prompts_come_back_as_asked_at_the_default_settings(http, model, side, prompt, wanted):
    response = http.post("/v1/images/generations", json={"prompt": prompt, "response_format": "b64_json", "seed": 7,
                                                         "model": model})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == f"{side}x{side}", "each model draws at its own default size"
    picture = seen(response.json()["data"][0]["b64_json"])
    assert (picture.colour, picture.shape, picture.background) == (wanted.colour, wanted.shape, wanted.background)
    if wanted.position:
        assert picture.position == wanted.position


@pytest.mark.parametrize("prompt, wanted", [
    ("a large yellow ring on a blue background", Scene("yellow", "ring", "blue")),
    ("a large white ring on the left on a black background", Scene("white", "ring", "black", "left")),
])
def test_the_shipped_ring_adapter_draws_rings_the_model_alone_never_draws(http, prompt, wanted):
    body = {"prompt": prompt, "response_format": "b64_json", "seed": 11}
    ring = seen(http.post("/v1/images/generations", json={**body, "loras": [{"name": "ring"}]}).json()[
        "data"][0]["b64_json"])
    assert (ring.colour, ring.shape, ring.background) == (wanted.colour, wanted.shape, wanted.background)
    alone = seen(http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
    assert alone.shape != "ring" and alone.colour == wanted.colour


def test_dashai_flow_draws_the_prompt(http):
    session = http.post("/api/v1/generative-session/", json={
        "task_name": "TextToImageGenerationTask", "model_name": "shapes-32", "name": "demo", "parameters": {"seed": 3},
    }).json()
    process = http.post("/api/v1/generative-process/", data={"session_id": session["id"],
                                                             "text_0": "a white square on a purple background"}).json()
    deadline = time.monotonic() + 60
    while (process := http.get(f"/api/v1/generative-process/{process['id']}", params={"base64": "true"}).json())[
            "status"] not in (3, 4) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process["status"] == 3, process
    picture = seen(process["output"][0]["data"])
    assert (picture.colour, picture.shape, picture.background) == ("white", "square", "purple")


def test_readme_examples_work_as_printed_and_the_quickstart_picture_is_what_curl_makes(demo_server, tmp_path):
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme[readme.index("## Try it"):readme.index("## HTTP API")]
    examples = re.findall(r"```(bash|python)\n(.*?)```", section, re.DOTALL)
    assert len(examples) >= 3
    for language, code in examples:
        code = code.replace("http://127.0.0.1:3000", demo_server.url)  # the test server's port
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (code, done.stdout, done.stderr)
    assert len(list(tmp_path.glob("openai-*.png"))) == 2

    made = Image.open(tmp_path / "image.png").convert("RGB")
    assert made.size == (64, 64)
    prompt = re.search(r'"prompt": "([^"]+)"', section).group(1)
    assert prompt == "a red circle on a blue background"
    picture = judge(made)
    assert (picture.colour, picture.shape, picture.background) == ("red", "circle", "blue")
    shown = Image.open(QUICKSTART_PICTURE).convert("RGB")
    difference = np.abs(np.asarray(made, dtype=np.int16) - np.asarray(shown, dtype=np.int16))
    assert difference.mean() < 2, "docs/quickstart.png is not what the README's curl line makes"
