"""`bentoml build` turns the project into a deployable Bento, offline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from t2i_task.config.settings import load_settings
from t2i_task.local_server import BENTOML, PROJECT_ROOT


def test_bentoml_build_packs_code_configuration_model_and_dockerfile(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}

    done = subprocess.run(
        [str(BENTOML), "build", "--output", "tag"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    [bento] = [p for p in (tmp_path / "home" / "bentos" / "t2i-task").iterdir() if p.name != "latest"]
    src = bento / "src"
    for path in ("service.py", "configuration.yaml", "t2i_task/task.py", "t2i_task/generation/runner.py",
                 "t2i_task/storage/store.py", "t2i_task/api/dashai.py", "t2i_task/api/openai.py",
                 "t2i_task/storage/migrations/versions/0001_release_0_1_0.py", "t2i_task/ui/index.html",
                 "t2i_task/ui/js/app.js"):
        assert (src / path).is_file(), f"{path} missing from the Bento"
    # Every model of the shipped registry that lives in the project, whole (weights, configs, card).
    shipped = [Path(model.path) for model in load_settings().served_models]
    assert shipped and all(folder.is_relative_to(PROJECT_ROOT) for folder in shipped)
    for file in (file for folder in shipped for file in folder.rglob("*") if file.is_file()):
        assert (src / file.relative_to(PROJECT_ROOT)).is_file(), f"{file} missing from the Bento"
    for unwanted in ("tests", ".venv", "data", ".git"):
        assert not (src / unwanted).exists(), f"{unwanted} must not be packed"
    assert not list(src.rglob("__pycache__"))

    assert yaml.safe_load((bento / "bento.yaml").read_text())["service"] == "service:TextToImageService"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and "bentoml==1.4.40" in requirements
    # deploy/Dockerfile.template: `make container` picks the base image, the torch build
    # (CPU wheels or PyPI's CUDA one) and xformers with these build args.
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "install.sh" in dockerfile
    for line in ("ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}", "ARG UV_FIND_LINKS", "ARG XFORMERS=",
                 "chown bentoml:bentoml /data", "ENV T2I_DATABASE_URL=", "STOPSIGNAL SIGTERM"):
        assert line in dockerfile, f"{line!r} missing from the Dockerfile"
    assert dockerfile.index("ARG UV_FIND_LINKS") < dockerfile.index("install.sh")

    openapi = (bento / "apis" / "openapi.yaml").read_text()
    assert "/v1/images/generations" in openapi and "/api/v1/generative-process/" in openapi
