# `make test` and `make serve` are all a new machine needs: each creates .venv,
# installs the project and writes the offline model when they are missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_DIR := models/tiny-sd
INSTALLED := $(VENV)/.installed
PORT ?= 3000
# BentoML's usage tracking would try the network on every command.
export BENTOML_DO_NOT_TRACK := True

.PHONY: install model serve test bento bench bench-runner loadtest clean

install: $(INSTALLED)

# Re-installs whenever pyproject.toml or requirements.txt changes. torch is pinned there to the
# CPU wheel that lies on this project's machines (see README, Installing).
$(INSTALLED): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

model: $(MODEL_DIR)/model_index.json

$(MODEL_DIR)/model_index.json: t2i_task/tiny_model.py | $(INSTALLED)
	$(PY) -m t2i_task.tiny_model $(MODEL_DIR)

# Serves configuration.yaml's model on http://127.0.0.1:$(PORT) (PORT=8080 make serve).
serve: install model
	$(VENV)/bin/bentoml serve service:TextToImageService --host 127.0.0.1 --port $(PORT)

test: install model
	$(PY) -m pytest

# A Bento (code, configuration, model, GPU Dockerfile) in $$BENTOML_HOME/bentos/.
bento: install model
	$(VENV)/bin/bentoml build

# Bare-pipeline ceiling, then the real server at concurrency 1, 4, 16, 64:
# prints a table, writes bench/results.json and .png, updates docs/benchmarks.md.
bench: install model
	$(PY) bench/benchmark.py $(BENCH_ARGS)

# Locust against a running server: URL=http://host:port USERS=16 TIME=1m make loadtest
URL ?= http://127.0.0.1:$(PORT)
USERS ?= 16
TIME ?= 1m
loadtest: install
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(URL) -u $(USERS) -r $(USERS) -t $(TIME) --only-summary

# DiffusionRunner.generate versus the bare diffusers pipeline (docs/benchmarks.md).
bench-runner: install model
	$(PY) bench/runner_overhead.py

clean:
	rm -rf $(VENV) models data .pytest_cache *.egg-info
