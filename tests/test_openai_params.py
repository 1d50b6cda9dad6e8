"""The parameters OpenAI's GPT image clients send, through the stock `openai` client."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


def image_bytes(response) -> bytes:
    return base64.b64decode(response.data[0].b64_json)


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_each_output_format_comes_back_in_its_own_bytes_with_the_echoes(client, output_format):
    response = client.images.generate(
        prompt="a red circle", model="tiny-sd", size="64x64", quality="low", output_format=output_format,
        output_compression=80, background="opaque", moderation="low", style="vivid", user="u-1",
        safety_identifier="hashed", extra_body={"seed": 3},
    )
    data = image_bytes(response)
    if output_format == "webp":
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    else:
        assert data.startswith(MAGIC[output_format])
    assert Image.open(io.BytesIO(data)).size == (64, 64)
    assert (response.size, response.quality, response.output_format, response.background) == (
        "64x64", "low", output_format, "opaque")


def test_quality_sets_the_step_count_from_the_models_default(client, http):
    # The shipped defaults: 10 steps; low is half of them, high twice.
    for quality, steps in (("low", 5), ("medium", 10), ("high", 20), ("hd", 20), ("standard", 10)):
        response = client.images.generate(prompt=f"quality {quality}", size="64x64", quality=quality,
                                          response_format="url")
        png = Image.open(io.BytesIO(http.get(response.data[0].url).content))
        assert png.text["num_inference_steps"] == str(steps), quality


def test_size_auto_is_the_models_own_size(client):
    response = client.images.generate(prompt="a square", size="auto", output_format="png")
    assert response.size == "32x32" and Image.open(io.BytesIO(image_bytes(response))).size == (32, 32)


@pytest.mark.parametrize(("parameters", "named"), [
    ({"background": "transparent"}, "background"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "svg"}, "output_format"),
    ({"quality": "ultra"}, "quality"),
    ({"output_compression": 101}, "output_compression"),
    ({"moderation": "none"}, "moderation"),
    ({"style": "photographic"}, "style"),
    ({"frame_count": 4}, "frame_count"),
    ({"stream": True, "n": 2}, "n"),
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"output_format": "jpeg", "response_format": "url"}, "output_format"),
    ({"surprise": 1}, "surprise"),
])
def test_values_this_server_cannot_honour_are_a_400_naming_the_parameter(http, parameters, named):
    answer = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"} | parameters)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and (error["param"] == named or named in error["message"]), error
