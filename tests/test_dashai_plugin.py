"""The DashAI plugin (integrations/dashai) against the real server, on DashAI's real base classes.

DashAI 0.10.0 is installed without its dependencies (make install), beside the
few that importing its model base classes needs; the plugin is installed in
editable mode, so DashAI's own entry point lookup finds it.
"""

from __future__ import annotations

import os
import threading
import time
from importlib.metadata import entry_points
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from DashAI.back.models.text_to_image_generation_model import TextToImageGenerationTaskModel
from dashai_t2i_server import client as plugin_client
from dashai_t2i_server.client import InferenceServer, ServerError
from dashai_t2i_server.model import SHIPPED_FORM, InferenceServerModel, build_schema, server_form, server_models

from t2i_task.config.settings import load_settings
from t2i_task.local_server import free_port, start_server, write_config
from tests.gate import Gate, wait_for

KEY = "plugin-test-key"
FORM = {"num_inference_steps": 2, "guidance_scale": 3.0, "width": 64, "height": 48, "seed": 5,
        "num_images_per_prompt": 2}


@pytest.fixture(scope="module")
def plugin_server(tiny_model_path, tmp_path_factory):
    """A server whose limits differ from the shipped ones, so the form shows where it got its own."""
    folder = tmp_path_factory.mktemp("plugin")
    config = write_config(folder, tiny_model_path, limits={"max_width": 256, "max_height": 256, "max_steps": 20},
                          defaults={"num_inference_steps": 4})
    server = start_server(config, env=Gate(folder).env(T2I_TEST_POISON="poison"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_gate(tmp_path_factory):
    return Gate(tmp_path_factory.mktemp("keyed"))


@pytest.fixture(scope="module")
def keyed_server(tiny_model_path, keyed_gate):
    """Keys on, and room for one generation at a time: the second is refused with 429."""
    config = write_config(keyed_gate.path.parent, tiny_model_path, serving={"max_queued_generations": 1})
    server = start_server(config, env=keyed_gate.env(T2I_API_KEYS=KEY))
    yield server
    server.stop()


def model(url: str, **form) -> InferenceServerModel:
    return InferenceServerModel(server_url=url, **(FORM | form))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_dashai_finds_the_plugin_as_a_ready_text_to_image_model():
    [plugin] = [ep.load() for ep in entry_points(group="dashai.plugins") if ep.name == "InferenceServerModel"]
    assert plugin is InferenceServerModel and issubclass(plugin, TextToImageGenerationTaskModel)
    assert plugin.get_metadata()["requires_download"] is False
    assert "inference server" in plugin.DISPLAY_NAME.en
    properties = plugin.get_schema()["properties"]
    assert {"server_url", "model", "num_inference_steps", "guidance_scale", "negative_prompt", "width", "height",
            "seed", "num_images_per_prompt", "loras"} == set(properties)
    assert not any("key" in name for name in properties), "the API key must never be a form field"


def test_optional_texts_start_blank_with_null_first_and_a_blank_means_none():
    """DashAI's front end shows a text box holding "" in red and flattens [text, null] into a box that refuses
    null; DashAI stores the form's values as they are (`make test-dashai` walks it in a browser)."""
    properties = InferenceServerModel.get_schema()["properties"]
    for name in ("model", "negative_prompt"):
        assert properties[name]["placeholder"] == " ", name
        assert [option["type"] for option in properties[name]["anyOf"]] == ["null", "string"], name
    blank = model("http://127.0.0.1:1", model=" ", negative_prompt=" ")
    assert blank.model is None and "negative_prompt" not in blank.parameters
    chosen = model("http://127.0.0.1:1", model="shapes-32", negative_prompt="blurry")
    assert chosen.model == "shapes-32" and chosen.parameters["negative_prompt"] == "blurry"


def test_the_model_field_starts_at_the_servers_default_model_and_names_the_others():
    properties = build_schema(SHIPPED_FORM, {"shapes-64": ["ring"], "shapes-32": []}).model_json_schema()["properties"]
    assert properties["model"]["placeholder"] == "shapes-64"  # text, so DashAI's form shows no field in red
    assert "shapes-32" in str(properties["model"]["anyOf"][1]["description"])
    assert properties["loras"]["placeholder"] == " " and "shapes-64: ring" in str(properties["loras"]["anyOf"][1])


def test_the_form_takes_the_servers_limits_and_defaults(plugin_server, monkeypatch):
    monkeypatch.setenv("T2I_SERVER_URL", plugin_server.url)
    assert server_models() == {"tiny-sd": []}, "its models and their adapters (none here)"
    form = server_form()
    assert form["width"] == {"minimum": 32, "maximum": 256, "placeholder": 32}
    assert form["num_inference_steps"] == {"minimum": 1, "maximum": 20, "placeholder": 4}


def test_without_the_server_the_form_carries_the_shipped_configurations_limits(monkeypatch):
    monkeypatch.setenv("T2I_SERVER_URL", f"http://127.0.0.1:{free_port()}")
    assert server_form() == SHIPPED_FORM
    shipped = load_settings().default_model
    schema = shipped.parameters_model.model_json_schema()["properties"]
    for name, spec in SHIPPED_FORM.items():
        bounds = {key: schema[name][key] for key in ("minimum", "maximum") if key in schema[name]}
        assert {key: spec[key] for key in bounds} == bounds, name
        assert spec["placeholder"] == (getattr(shipped.defaults, name) or ""), name


def test_generate_returns_the_requested_size_and_count_and_a_seed_reproduces(plugin_server):
    first = model(plugin_server.url).generate("a red circle")
    assert [image.size for image in first] == [(64, 48), (64, 48)]
    again = model(plugin_server.url).generate("a red circle")
    other = model(plugin_server.url, seed=6).generate("a red circle")
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(first, again))
    assert np.abs(pixels(first[0]) - pixels(other[0])).max() > 10
    # One session per parameter set on the server, not one per DashAI process.
    sessions = httpx.get(f"{plugin_server.url}/api/v1/generative-session/").json()
    assert len([s for s in sessions if s["name"].startswith("DashAI ")]) == 2


def address(url: str) -> str:
    return url.split("://", 1)[1]


def test_an_unreachable_server_is_named_in_a_message_dashai_shows_whole(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match=f"Cannot reach the inference server at {address(url)} ") as failed:
        model(url).generate("a red circle")
    # DashAI shows a process's output rows through os.path.basename: no "/" may cut the message.
    message = f"Error details: {failed.value}"
    assert os.path.basename(message) == message


def test_a_refused_parameter_comes_back_as_the_servers_sentence(plugin_server):
    with pytest.raises(ServerError) as refused:
        model(plugin_server.url, width=512, height=512).generate("a red circle")
    assert str(refused.value) == (f"The inference server at {address(plugin_server.url)} refused the request (422): "
                                  "width must be between 32 and 256, got 512")


def test_a_failed_generation_says_why_with_the_process_id(plugin_server):
    with pytest.raises(ServerError, match=r"could not generate the images \(process \d+\): .*out of memory"):
        model(plugin_server.url, num_images_per_prompt=1).generate("poison")


def test_a_missing_or_wrong_api_key_is_named(keyed_server, monkeypatch):
    monkeypatch.delenv("T2I_API_KEY", raising=False)
    with pytest.raises(ServerError, match=r"refused the request \(401\): the API key is missing: set T2I_API_KEY"):
        model(keyed_server.url).generate("a red circle")
    monkeypatch.setenv("T2I_API_KEY", "not-the-key")
    with pytest.raises(ServerError, match=r"\(401\): the API key in T2I_API_KEY is wrong"):
        model(keyed_server.url).generate("a red circle")
    monkeypatch.setenv("T2I_API_KEY", KEY)
    assert len(model(keyed_server.url).generate("a red circle")) == 2


def hold_one_generation(url: str, gate: Gate) -> threading.Thread:
    """Fill the server's one place with a generation held at the gate."""
    call = threading.Thread(target=lambda: httpx.post(
        f"{url}/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
        json={"prompt": "holding the place", "size": "64x64", "num_inference_steps": 1}))
    call.start()
    gate.wait_until_held()
    return call


def test_a_busy_server_is_retried_after_its_retry_after(keyed_server, keyed_gate, monkeypatch):
    server = InferenceServer(keyed_server.url, KEY, retries=2)
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the first refusal: free the place, then retry at once
        waits.append(seconds)
        keyed_gate.open()
        wait_for(lambda: not held.is_alive(), what="the held generation to end")

    keyed_gate.close()
    held = hold_one_generation(keyed_server.url, keyed_gate)
    monkeypatch.setattr(plugin_client, "time", SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    try:
        images = server.generate("a red circle", None, FORM)
    finally:
        keyed_gate.open()
    assert waits[0] == 5 and len(images) == 2  # the server's Retry-After, then the retry got in


def test_a_server_that_stays_busy_is_given_up_with_a_clear_message(keyed_server, keyed_gate):
    server = InferenceServer(keyed_server.url, KEY, retries=0)
    with keyed_gate.closed():
        held = hold_one_generation(keyed_server.url, keyed_gate)
        with pytest.raises(ServerError, match=rf"at {address(keyed_server.url)} is busy \(429: Server busy: .*\); "
                                              "gave up after 1 try"):
            server.generate("a red circle", None, FORM)
    held.join()


def test_the_overall_limit_names_the_process_it_gave_up_on(keyed_server, keyed_gate):
    server = InferenceServer(keyed_server.url, KEY, max_wait_s=2)
    with keyed_gate.closed():
        with pytest.raises(ServerError, match=r"Gave up after 2 s waiting for process \d+ on the inference server"):
            server.generate("a red circle", None, FORM)
