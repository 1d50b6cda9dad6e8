"""The size policy: sizes a model draws well are drawn as asked, others inside its range with the
asked aspect ratio, and the cost limit counts the drawn size."""

from __future__ import annotations

import pytest
from PIL import Image
from pydantic import ValidationError

from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import ParameterError
from t2i_task.config.settings import Settings
from t2i_task.config.sizes import DrawnSizes, resized

SD15 = DrawnSizes(native=512, min=256, max=768)
SHAPES = DrawnSizes(native=32, min=32, max=48)


@pytest.mark.parametrize(("sizes", "asked", "drawn"), [
    (SD15, (512, 512), (512, 512)),      # inside the range: as asked
    (SD15, (768, 256), (768, 256)),
    (SD15, (1024, 1024), (768, 768)),    # above: scaled down to the largest side
    (SD15, (1792, 1024), (768, 440)),    # 768 x 438.9, rounded to a multiple of 8
    (SD15, (1024, 1536), (512, 768)),
    (SD15, (64, 64), (256, 256)),        # below: scaled up to the smallest side
    (SD15, (128, 64), (512, 256)),
    (SD15, (2048, 64), (768, 256)),      # too long to keep its ratio inside the range: clamped
    (SHAPES, (256, 256), (48, 48)),
    (SHAPES, (1792, 1024), (48, 32)),    # 48 x 27.4 rounds to 24, below the range: 32
    (SHAPES, (1024, 1792), (32, 48)),
    (SHAPES, (40, 48), (40, 48)),
])
def test_the_drawn_size_keeps_the_asked_aspect_ratio_inside_the_range(sizes, asked, drawn):
    assert sizes.drawn(*asked) == drawn


def test_a_range_must_hold_the_native_size_in_multiples_of_the_models_factor():
    with pytest.raises(ValidationError, match="min <= native <= max"):
        DrawnSizes(native=1024, min=256, max=768)
    with pytest.raises(ValidationError, match="multiples of 8"):
        DrawnSizes(native=512, min=250, max=768)


def test_a_drawn_image_is_resized_to_exactly_the_asked_size():
    drawn = Image.new("RGB", (48, 32), "red")
    assert resized(drawn, 1792, 1024).size == (1792, 1024)
    assert resized(drawn, 48, 32) is drawn


def settings(sizes: dict | None) -> ServedModel:
    """1 s per megapixel-step: a budget of 16 s fits 512x512 at 50 steps, not 1024x1024."""
    return Settings.model_validate({
        "model": {"name": "m", "path": "m", "sizes": sizes,
                  "cost": {"overhead_s": 0.0, "seconds_per_megapixel_step": 1.0}},
        "serving": {"request_timeout_s": 30}, "batching": {"max_latency_ms": 20_000},
        "limits": {"min_size": 32, "max_width": 2048, "max_height": 2048, "max_steps": 100},
        "storage": {"database_url": "sqlite://", "images_dir": "/tmp/unused"},
        "defaults": {"width": 512, "height": 512, "num_inference_steps": 50},
    }).default_model


def test_the_cost_limit_counts_the_drawn_size_not_the_asked_one():
    asked = {"width": 2048, "height": 2048, "num_inference_steps": 50}
    with pytest.raises(ParameterError, match="2048x2048 at 50 steps"):
        settings(None).validate_parameters(asked)  # drawn as asked: 210 s
    drawn_at_512 = settings({"native": 512, "min": 256, "max": 512})
    assert drawn_at_512.validate_parameters(asked).width == 2048  # drawn at 512x512: 13 s
    with pytest.raises(ParameterError, match=r"2048x2048 \(drawn at 768x768\) at 50 steps"):
        settings({"native": 512, "min": 256, "max": 768}).validate_parameters(asked)  # 29 s
    assert "at most 2048x2048" in drawn_at_512.parameters_model.model_json_schema()["properties"]["width"]["description"]
