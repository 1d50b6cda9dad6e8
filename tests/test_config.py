"""configuration.yaml: validated once, errors name the key, env overrides apply."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from t2i_task.config.settings import DEFAULT_CONFIG_PATH, ConfigError, load_settings


@pytest.fixture
def write_config(tmp_path):
    base = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())

    def write(**sections) -> Path:
        """The shipped file with `sections` over it; `model=` is its registry's default entry (None: no model)."""
        data = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
        data["models"] = [dict(entry) for entry in base["models"]]
        for section, values in sections.items():
            if section == "model" and values is None:
                data.pop("models"), data.pop("default_model")
            elif section == "model":
                data["models"][0].update(values)
                data["default_model"] = data["models"][0]["name"]
            elif values is None:
                data.pop(section, None)
            elif isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        path = tmp_path / "conf" / "configuration.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    for name in ("T2I_CONFIG", "T2I_DATABASE_URL", "T2I_IMAGES_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_the_shipped_configuration_serves_the_projects_models_64_pixels_by_default():
    settings = load_settings()
    root = DEFAULT_CONFIG_PATH.parent
    assert settings.default_model.path == str(root / "demo_model_64") and settings.default_model.name == "shapes-64"
    assert {m.name: m.path for m in settings.served_models}["shapes-32"] == str(root / "demo_model")
    assert settings.storage.database_url == f"sqlite:///{root / 'data' / 't2i.db'}"
    assert settings.storage.images_dir == str(root / "data" / "images")
    assert settings.runtime.device == "auto" and settings.batching.max_batch_size > 1


def test_relative_paths_are_resolved_against_the_files_folder(write_config, monkeypatch, tmp_path):
    path = write_config()
    monkeypatch.chdir(tmp_path)  # another working directory changes nothing
    settings = load_settings(path)
    assert settings.storage.images_dir == str(path.parent / "data" / "images")
    assert settings.default_model.path == str(path.parent / "demo_model_64")


def test_a_hub_model_id_is_kept_as_it_is(write_config):
    settings = load_settings(write_config(model={"path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}))
    assert settings.default_model.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_environment_overrides_the_storage_keys_and_the_file(write_config, monkeypatch, tmp_path):
    monkeypatch.setenv("T2I_CONFIG", str(write_config(model={"name": "from-env-file"})))
    monkeypatch.setenv("T2I_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("T2I_IMAGES_DIR", str(tmp_path / "shared-images"))

    settings = load_settings()
    assert settings.default_model.name == "from-env-file"
    assert settings.storage.database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    assert settings.storage.images_dir == str(tmp_path / "shared-images")


@pytest.mark.parametrize(
    ("sections", "named"),
    [
        ({"runtime": {"devcie": "cpu"}}, "runtime.devcie: Extra inputs are not permitted"),
        ({"runtime": {"device": "tpu"}}, "runtime.device"),
        ({"batching": {"max_batch_size": 1}}, "batching.max_batch_size"),
        ({"defaults": {"width": 100}}, "defaults.width: Input should be a multiple of 8"),
        ({"model": {"defaults": {"num_inference_steps": 500}}},
         "model shapes-64: its defaults do not fit its limits: num_inference_steps must be between 1 and 50"),
        ({"model": {"limits": {"max_stepz": 5}}}, "model shapes-64: max_stepz: Extra inputs are not permitted"),
        ({"default_model": "sdxl"}, "default_model 'sdxl' is not one of the models: shapes-64, shapes-32"),
        ({"models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "aliases": ["a"]}]},
         "the model name 'a' is used twice"),
        ({"model": None}, "no model: give `model` (one model) or `models` (a registry)"),
        ({"batching": {"max_latency_ms": 700_000}}, "max_latency_ms must be below serving.request_timeout_s"),
        ({"surprise": {"a": 1}}, "surprise: Extra inputs are not permitted"),
    ],
)
def test_a_bad_key_or_value_is_an_error_that_names_it(write_config, sections, named):
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        load_settings(write_config(**sections))
    assert named in str(error.value)


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(tmp_path / "list.yaml")


def test_session_parameters_fill_in_defaults_and_respect_limits():
    settings = load_settings()
    params = settings.default_model.validate_parameters({"width": 128, "seed": 5})
    assert (params.width, params.height, params.seed) == (128, settings.default_model.defaults.height, 5)
    assert params.num_inference_steps == settings.default_model.defaults.num_inference_steps


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"width": 70}, "width"),
        ({"height": 4096}, "height must be between"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps must be between 1 and 50"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"num_images_per_prompt": 5}, "num_images_per_prompt must be between 1 and 4"),
        ({"seed": -2}, "seed"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt is longer than 1000"),
        ({"sampler": "euler"}, "sampler"),
    ],
)
def test_bad_session_parameters_are_refused_by_name(parameters, named):
    with pytest.raises(ValueError, match=named):
        load_settings().default_model.validate_parameters(parameters)
