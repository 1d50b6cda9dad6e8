# `make test` and `make serve` are all a new machine needs: each creates .venv and
# installs the project when missing. The served model, demo_model/, is in the repository.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PORT ?= 3000
CHROMIUM := /usr/bin/chromium
# BentoML's usage tracking would try the network on every command.
export BENTOML_DO_NOT_TRACK := True

.PHONY: install serve test test-dashai test-repeat fuzz migration calibrate bento container smoke bench bench-runner bench-replicas loadtest loadtest-batch demo-model shapes-64 adapter-ring clean

install: $(INSTALLED)

# Re-installs whenever pyproject.toml or requirements.txt changes. torch is pinned there to the
# CPU wheel that lies on this project's machines (see README, Installing).
# The second pip installs the DashAI plugin (integrations/dashai) and, for its tests, DashAI's
# own base classes without DashAI's dependencies (several GB; the few its model classes
# import are in the dev extra).
$(INSTALLED): pyproject.toml requirements.txt integrations/dashai/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps dashai==0.10.0 -e ./integrations/dashai
	touch $@

# Serves configuration.yaml's model on http://127.0.0.1:$(PORT) (PORT=8080 make serve).
serve: install
	$(VENV)/bin/bentoml serve service:TextToImageService --host 127.0.0.1 --port $(PORT)

test: install $(CHROMIUM)
	$(PY) -m pytest

# Debian's Chromium, which the browser tests drive with Playwright (tests/browser.py): Playwright
# cannot download its own browsers on this project's machines. Installed once, as root.
$(CHROMIUM):
	apt-get install -y chromium || (apt-get update && apt-get install -y chromium)

# DashAI 0.10.0 itself with the plugin, against this server (docs/dashai-plugin.md); not in
# `make test`: DashAI's install is about 8 GB. Makes $(DASHAI_VENV) if missing (torch 2.14.1 and
# torchvision 0.29.1, then dashai==0.10.0; minutes), reinstalls the plugin there, starts this
# server and DashAI (port 8000), generates through DashAI's REST API, walks DashAI's own UI with the
# plugin's model in Chromium (tests/dashai_walk.py), then stops this server and checks DashAI's next
# process fails naming it. Prints timings; exits non-zero on any failure.
DASHAI_VENV ?= .venv-dashai
test-dashai: install $(CHROMIUM)
	$(PY) integrations/dashai/e2e.py --venv $(DASHAI_VENV)

# The whole suite N times on a fresh clone of HEAD, with BUSY cores kept busy meanwhile:
# prints each run's counts, time and failed tests (make test-repeat N=3 BUSY=2).
N ?= 5
BUSY ?= 0
test-repeat:
	$(PYTHON) tests/repeat_suite.py $(N) --busy-cores $(BUSY)

# The fuzz tests with new random examples each run (make test always sends the same ones).
fuzz: install
	T2I_FUZZ_RANDOM=1 T2I_FUZZ_EXAMPLES=200 $(PY) -m pytest tests/test_fuzz.py

# A Bento (code, configuration, model, GPU Dockerfile) in $$BENTOML_HOME/bentos/.
bento: install
	$(VENV)/bin/bentoml build

# The Bento's Docker image (docs/deployment.md): VARIANT=cpu (CPU-only torch) or gpu (CUDA
# torch), tagged IMAGE. BASE_IMAGE replaces python:3.11-slim, e.g. t2i-base:bookworm made by
# deploy/base-image.sh where no image registry is reachable.
VARIANT ?= cpu
IMAGE ?= t2i-task:$(VARIANT)
BASE_IMAGE ?=
container: bento
	BASE_IMAGE=$(BASE_IMAGE) deploy/container.sh $(VARIANT) $(IMAGE)

# Builds the image, serves it with a volume, generates one picture, checks `docker stop` drains.
smoke: install
	VARIANT=$(VARIANT) BASE_IMAGE=$(BASE_IMAGE) deploy/smoke.sh

# A new schema migration from the models' changes (t2i_task/storage/migrations/versions/; read it
# before committing): make migration MESSAGE="add the progress columns"
migration: install
	$(PY) -m t2i_task.storage.schema "$(MESSAGE)"

# Measures what a generation costs on this machine and rewrites model.cost in the configuration
# (T2I_CONFIG for another file): the cost limit and the scheduler follow it (README, Limits).
calibrate: install
	$(PY) -m t2i_task.generation.calibrate

# Bare-pipeline ceiling, then the real server at concurrency 1, 4, 16, 64:
# prints a table, writes bench/results.json and .png, updates docs/benchmarks.md.
# Then bulk jobs beside live traffic (bench/bulk_fairness.py, the Batch API's goals).
bench: install
	$(PY) bench/benchmark.py $(BENCH_ARGS)
	$(PY) bench/bulk_fairness.py
	$(PY) bench/key_fairness.py

# Locust against a running server: URL=http://host:port USERS=16 TIME=1m make loadtest
URL ?= http://127.0.0.1:$(PORT)
USERS ?= 16
TIME ?= 1m
loadtest: install
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless --host $(URL) -u $(USERS) -r $(USERS) -t $(TIME) --only-summary

# Through bulk jobs: each user uploads a batch of LINES prompts, waits for it, downloads its results.
LINES ?= 100
loadtest-batch: install
	T2I_LOAD_LINES=$(LINES) $(VENV)/bin/locust -f loadtest/batch_locustfile.py --headless --host $(URL) -u $(USERS) -r $(USERS) -t $(TIME) --only-summary

# What each image costs the shared PostgreSQL with 2 and 3 replicas and images in a bucket
# (moto's S3 server); needs PostgreSQL (T2I_TEST_POSTGRES_URL) and nothing else using it (docs/scaling.md).
bench-replicas: install
	$(PY) bench/replicas_cost.py

# DiffusionRunner.generate versus the bare diffusers pipeline (docs/benchmarks.md).
bench-runner: install
	$(PY) bench/runner_overhead.py

# Trains the `ring` LoRA adapter of shapes-64 into models/adapter-ring (about 25 minutes on 2 idle CPU
# cores), then scores it with and without the adapter; copy models/adapter-ring/ring.* into
# demo_model_64/loras/ to ship it (demo_model_64/loras/README.md).
adapter-ring: install
	$(PY) -m training.train_adapter demo_model_64 models/adapter-ring --shape ring --rank 8 --steps 4000
	$(PY) -m training.evaluate_adapter demo_model_64 models/adapter-ring --shape ring --card models/adapter-ring

# Retrains the shipped demo model into models/demo (35 minutes on 2 CPU cores), then
# scores it with the judge; copy the folder over demo_model/ to ship it (demo_model/README.md).
demo-model: install
	$(PY) -m training.train_demo_model models/demo
	cp demo_model/README.md models/demo/README.md
	$(PY) -m training.evaluate models/demo --card

# Trains shapes-64 (64x64 pictures, 16x16 latents) into models/shapes-64, then scores it with the
# judge: the denoiser, then 1200 steps more with offset noise (demo_model_64/README.md says why).
# 2 hours on 2 CPU cores; each run saves its state every 100 steps, and running it again after a
# stop resumes where it stopped. Copy the folder over demo_model_64/ to ship it.
shapes-64: install
	$(PY) -m training.train_demo_model models/shapes-64-base --resolution 64 --latent-side 16 --unet-steps 4500 --threads 2
	$(PY) -m training.train_demo_model models/shapes-64 --resolution 64 --latent-side 16 --init models/shapes-64-base \
		--unet-steps 1200 --lr 2.5e-4 --noise-offset 0.1 --threads 2
	cp demo_model_64/README.md models/shapes-64/README.md
	$(PY) -m training.evaluate models/shapes-64 --images 300 --card

clean:
	rm -rf $(VENV) models data .pytest_cache *.egg-info
