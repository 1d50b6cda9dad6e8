"""The cost limit: a request that cannot finish in time is refused, naming what would."""

from __future__ import annotations

import shutil

import pytest
import yaml

from t2i_task.config.cost import GenerationCost, largest_square
from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import ParameterError
from t2i_task.config.settings import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from t2i_task.generation.calibrate import measure, store
from t2i_task.generation.runner import DiffusionRunner

# 1 s per megapixel-step and no overhead: a 512x512 image at 50 steps takes 13.1 s.
COST = {"overhead_s": 0.0, "seconds_per_megapixel_step": 1.0}


def settings(cost=COST, timeout_s=30, **defaults) -> ServedModel:
    """A model whose calls may hold 0.8 x 20 s = 16 s of work."""
    return Settings.model_validate({
        "model": {"name": "m", "path": "m", "cost": cost},
        "serving": {"request_timeout_s": timeout_s},
        "batching": {"max_latency_ms": 20_000},
        "limits": {"min_size": 32, "max_width": 1024, "max_height": 1024, "max_steps": 100,
                   "max_images_per_request": 4},
        "storage": {"database_url": "sqlite://", "images_dir": "/tmp/unused"},
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 10} | defaults,
    }).default_model


def test_the_estimate_is_pixels_times_steps_times_images_plus_overhead():
    cost = GenerationCost(overhead_s=0.5, seconds_per_megapixel_step=2.0)
    assert cost.seconds(1000, 1000, 10) == pytest.approx(20.5)
    assert cost.seconds(1000, 1000, 10, images=3) == pytest.approx(61.5)
    assert cost.max_pixels(steps=10, images=1, budget_s=20.5) == 1_000_000
    assert cost.max_steps(1000, 1000, images=1, budget_s=20.5) == 10
    assert largest_square(65_535) == 248 and largest_square(65_536) == 256


def test_a_request_too_costly_to_finish_is_refused_naming_the_largest_size_and_steps():
    served = settings()
    assert served.budget_s == 16
    served.validate_parameters({"width": 512, "height": 512, "num_inference_steps": 50})  # 13.1 s: fits

    with pytest.raises(ParameterError) as refused:
        served.validate_parameters({"width": 512, "height": 512, "num_inference_steps": 50,
                                    "num_images_per_prompt": 2})
    message = str(refused.value)
    assert message == (
        "512x512 at 50 steps (2 images) would take about 26 s on this server, more than the 16 s a generation may "
        "take: at 50 steps and 2 images the largest size is 400x400; at 512x512 and 2 images the most steps is 30."
    )
    # What it names is allowed, and one step or one size step more is not.
    served.validate_parameters({"width": 400, "height": 400, "num_inference_steps": 50, "num_images_per_prompt": 2})
    served.validate_parameters({"width": 512, "height": 512, "num_inference_steps": 30, "num_images_per_prompt": 2})
    for too_much in ({"width": 408, "height": 408, "num_inference_steps": 50},
                     {"width": 512, "height": 512, "num_inference_steps": 31}):
        with pytest.raises(ParameterError):
            served.validate_parameters(too_much | {"num_images_per_prompt": 2})


def test_when_nothing_fits_the_message_says_so():
    slow = settings(cost={"overhead_s": 0, "seconds_per_megapixel_step": 100}, width=32, height=32, num_inference_steps=1)
    with pytest.raises(ParameterError, match="at 100 steps and 4 images no size fits; at 1024x1024 and 4 images "
                                             "no step count fits"):
        slow.validate_parameters({"width": 1024, "height": 1024, "num_inference_steps": 100, "num_images_per_prompt": 4})


def test_the_published_schema_states_the_cost_limit():
    schema = settings(num_inference_steps=50).parameters_model.model_json_schema()["properties"]
    for field in ("width", "height", "num_inference_steps", "num_images_per_prompt"):
        assert "must finish within 16 s here, e.g. one image at 50 steps is at most 560x560" in schema[field]["description"]
    assert "must finish" not in schema["guidance_scale"]["description"]
    # Where the field limits bind first, the example stays within them.
    width = settings().parameters_model.model_json_schema()["properties"]["width"]["description"]
    assert "one image at 10 steps is at most 1024x1024" in width


def test_an_uncalibrated_model_has_only_the_field_limits():
    served = settings(cost=None)
    served.validate_parameters({"width": 1024, "height": 1024, "num_inference_steps": 100, "num_images_per_prompt": 4})
    assert "must finish" not in served.parameters_model.model_json_schema()["properties"]["width"]["description"]


def test_defaults_that_could_not_finish_in_time_are_a_configuration_error():
    with pytest.raises(ValueError, match="the most steps is"):
        settings(width=1024, height=1024, num_inference_steps=100)


def test_the_shipped_configuration_is_calibrated_and_its_defaults_fit():
    shipped = load_settings()
    for model in shipped.served_models:
        assert model.cost is not None and model.cost.measured_on, model.name
        model.validate_parameters({})


def test_calibration_measures_the_model_and_rewrites_only_the_cost_line(tiny_model_path, tmp_path):
    config = tmp_path / "configuration.yaml"
    shutil.copy(DEFAULT_CONFIG_PATH, config)
    text = config.read_text().replace("path: ./demo_model_64\n", f"path: {tiny_model_path}\n")
    config.write_text(text)
    served = load_settings(config)

    cost, timings = measure(DiffusionRunner(served.default_model.path, served.runtime), served.default_model)
    # The smallest, middle and largest sides the model draws (model.sizes: 64 to 80), not the
    # sizes a client may ask for (up to 2048): those are drawn inside that range.
    assert [side for side, _ in timings] == [64, 72, 80]
    assert cost.seconds_per_megapixel_step > 0 and cost.overhead_s >= 0 and "CPU" in cost.measured_on

    store(config, cost)
    rewritten = config.read_text()
    changed = [line for old, line in zip(text.splitlines(), rewritten.splitlines()) if old != line]
    assert len(rewritten.splitlines()) == len(text.splitlines()) and len(changed) == 1
    assert changed[0].lstrip().startswith("cost: ")
    assert load_settings(config).default_model.cost == cost
    assert yaml.safe_load(rewritten)["models"][0]["cost"]["measured_on"] == cost.measured_on


def test_a_broken_cost_is_a_configuration_error_naming_it(tmp_path):
    config = tmp_path / "configuration.yaml"
    config.write_text(DEFAULT_CONFIG_PATH.read_text().replace("seconds_per_megapixel_step: ", "seconds_per_mp: "))
    with pytest.raises(ConfigError, match=r"models\.0\.cost"):
        load_settings(config)
