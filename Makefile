# `make test` and `make serve` are all a new machine needs: each creates .venv,
# installs the project and writes the offline model when they are missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/tiny-sd
INSTALLED := $(VENV)/.installed

.PHONY: install model test bench-runner clean

install: $(INSTALLED)

# Re-installs whenever pyproject.toml changes. torch is pinned there to the
# CPU wheel that lies on this project's machines (see README, Installing).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

model: $(MODEL_DIR)/model_index.json

$(MODEL_DIR)/model_index.json: t2i_task/tiny_model.py | $(INSTALLED)
	$(PY) -m t2i_task.tiny_model $(MODEL_DIR)

test: install model
	$(PY) -m pytest

# DiffusionRunner.generate versus the bare diffusers pipeline (docs/benchmarks.md).
bench-runner: install model
	$(PY) bench/runner_overhead.py

clean:
	rm -rf $(VENV) models data .pytest_cache *.egg-info
