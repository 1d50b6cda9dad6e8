"""The HTTP surface: DashAI's generative API and OpenAI's Images API over one batched model.

Two BentoML services:

- `DiffusionService` owns the `DiffusionRunner` and exposes one batchable
  `generate`: BentoML's adaptive batcher joins concurrent requests into one
  pipeline call. Beside it, `progress` and `cancel` answer while a call runs.
- `TextToImageService` speaks HTTP: a FastAPI app mounted at `/` with one
  router per API (`t2i_task/api/dashai.py`, `t2i_task/api/openai.py`, ...), the
  page at `/` (`t2i_task/api/page.py`) and the API reference at `/docs`. It owns
  the store, the task's adapters and the process queue
  (`t2i_task/jobs/processes.py`, which hands work over when the model has room:
  `t2i_task/jobs/scheduler.py`), and sends every generation, from every endpoint,
  through `DiffusionService.generate`.

A request's path: `prepare_input_for_database` -> store -> `prepare_for_task`
-> `DiffusionService.generate` -> `process_output` (PNG files) -> store ->
`process_output_from_database` on the way back out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import aiohttp
import bentoml
from bentoml.validators import ContentType
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel

from t2i_task.api import dashai, dashai_components, dashai_jobs, openai, openai_batches, openai_files, page, usage
from t2i_task.api.dashai_front_end import DashAIFrontEnd
from t2i_task.api.links import SECRET_NAME, LinkSigner, is_signed_image_request
from t2i_task.api.backend import Backend
from t2i_task.api.errors import install_error_handlers
from t2i_task.api.guards import (
    AnswerFailuresMiddleware,
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    JsonRouteErrorsMiddleware,
)
from t2i_task.config.keys import KeyRing
from t2i_task.config.settings import load_settings
from t2i_task.generation.adapters import Adapters
from t2i_task.generation.pool import ModelPool
from t2i_task.generation.runner import GenerationRequest, GenerationResult
from t2i_task.jobs.failures import ModelUnavailable
from t2i_task.jobs.model_calls import CallBatcher
from t2i_task.jobs.processes import ProcessQueue
from t2i_task.storage.store import Store
from t2i_task.storage.tables import Priority
from t2i_task.task import TextToImageGenerationTask

settings = load_settings()
logger = logging.getLogger("t2i.service")
MODEL_READY_POLL_S = 0.5
MODEL_CONTROL_TIMEOUT_S = 5  # a cancel or a progress question gets an answer even if the model service gives none
REQUESTS_AT_MODEL = bentoml.metrics.Gauge(
    name="t2i_requests_at_model",
    documentation="Generation requests sent to the model service or waiting for the next call to it",
    multiprocess_mode="livesum",
)
# BentoML's own adaptive_batch_size counts the calls it joins, and a call carries many requests.
MODEL_BATCH_SIZE = bentoml.metrics.Histogram(
    name="t2i_model_batch_size",
    documentation="Generation requests a model ran together (one model's share of a generate call)",
    labelnames=["model"],
    buckets=[1, 2, 4, 8, 16, 32, 64],
)
MODEL_LOADED = bentoml.metrics.Gauge(
    name="t2i_model_loaded",
    documentation="Whether each model of the registry is loaded in the model service (1) or not (0)",
    labelnames=["model"],
    multiprocess_mode="livemax",
)
MODEL_WEIGHTS_BYTES = bentoml.metrics.Gauge(
    name="t2i_model_weights_bytes",
    documentation="Bytes of each loaded model's weights on its device (what runtime.memory_budget_mb counts)",
    labelnames=["model"],
    multiprocess_mode="livemax",
)

# Counted in the database at each sweep (every replica sees the same figure): what an autoscaler
# scales on (deploy/kubernetes/, docs/scaling.md).
STORED_WORK_WAITING = bentoml.metrics.Gauge(
    name="t2i_stored_work_waiting",
    documentation="Stored generations waiting for a model on every replica (queued, not started), by priority",
    labelnames=["priority"],
    multiprocess_mode="livemax",
)


BATCH_LINES_WAITING = bentoml.metrics.Gauge(
    name="t2i_batch_lines_waiting",
    documentation="Lines of bulk jobs (OpenAI batches) waiting for a model on every replica (not started)",
    multiprocess_mode="livemax",
)


# Usage by API key name (never the key), read from the database at each sweep: every replica reports
# the same totals, which only grow (GET /v1/usage answers the same figures).
KEY_IMAGES = bentoml.metrics.Gauge(
    name="t2i_key_images",
    documentation="Images made for each API key (by its name), on every replica since usage was first counted",
    labelnames=["key"],
    multiprocess_mode="livemax",
)
KEY_MODEL_SECONDS = bentoml.metrics.Gauge(
    name="t2i_key_model_seconds",
    documentation="Model-seconds used by each API key (by its name): each generation's cost by its model's "
                  "calibration, on every replica",
    labelnames=["key"],
    multiprocess_mode="livemax",
)


def report_stored(counts: dict, used_by_key: list) -> None:
    for priority, count in counts.items():
        if priority is Priority.BULK:
            BATCH_LINES_WAITING.set(count)
        else:
            STORED_WORK_WAITING.labels(priority=priority.name.lower()).set(count)
    for used in used_by_key:
        KEY_IMAGES.labels(key=used.account).set(used.images)
        KEY_MODEL_SECONDS.labels(key=used.account).set(used.model_seconds)

# BentoML works out an answer's media type from its type's JSON schema at every answer (0.9 ms
# for `generate`'s, on a request's path) unless the type names it.
JSON = ContentType("application/json")


class GeneratedImages(BaseModel):
    """One request's images as raw RGB pixels: PNG encoding happens in the API
    process, beside the next batch, not in the model's worker."""

    width: int
    height: int
    pixels: list[bytes]
    seeds: list[int]
    error: str | None = None  # set when this request failed even when run alone
    previews: list[bytes] = []  # its partial images, same size
    prompt_tokens: int = 0

    @classmethod
    def of(cls, request: GenerationRequest, result: GenerationResult) -> GeneratedImages:
        return cls(width=request.width, height=request.height, pixels=raw(result.images), seeds=result.seeds,
                   error=result.error, previews=raw(result.previews), prompt_tokens=result.prompt_tokens)

    def result(self) -> GenerationResult:
        return GenerationResult(images=self._images(self.pixels), seeds=self.seeds, error=self.error,
                                previews=self._images(self.previews), prompt_tokens=self.prompt_tokens)

    def _images(self, pixels: list[bytes]) -> list[Image.Image]:
        return [Image.frombytes("RGB", (self.width, self.height), data) for data in pixels]


def raw(images: list[Image.Image]) -> list[bytes]:
    return [image.convert("RGB").tobytes() for image in images]


@bentoml.service(
    name="t2i-diffusion",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": settings.serving.request_timeout_s},
    # The API process's client renews its connection to this service every 100
    # calls and 5 minutes by default, closing the old one under the calls still
    # in flight: they fail, and the model still runs them (bentoml/BentoML#5698).
    # A local socket to one worker needs no renewal.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 10.0**9},
    # Only the API service calls this one, several times a request: the API's access log and
    # its traces record each request once. (OpenTelemetry's middleware otherwise opens a span
    # for every call here, in the worker whose GIL the pipeline needs.)
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": "/generate,/progress,/previews,/cancel,/load,/loaded,/adapters"},
)
class DiffusionService:
    def __init__(self) -> None:
        # The default model loads before the worker reports ready, so /readyz waits for it; the
        # registry's others load in the background (preload) or when first asked for.
        self.pool = ModelPool(settings.served_models, settings.runtime)
        for model in settings.served_models[1:]:
            if model.entry.preload:
                self.pool.start_loading(model.name)
        self._count_loaded()

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.batching.max_batch_size,
        max_latency_ms=settings.batching.max_latency_ms,
    )
    def generate(self, requests: list[GenerationRequest]) -> Annotated[list[GeneratedImages], JSON]:
        """Each model's requests through its own runner: requests for different models never share a
        pipeline call (the runner groups each model's by GenerationRequest.batch_key)."""
        results: list[GeneratedImages | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_model.setdefault(request.model or self.pool.default, []).append(index)
        for name, indexes in by_model.items():
            group = [requests[i] for i in indexes]
            MODEL_BATCH_SIZE.labels(model=name).observe(len(group))
            try:
                runner = self.pool.runner_for_call(name)
            except Exception as exc:  # its load failed: these requests fail, the others run
                outcomes = [GenerationResult(error=f"model {name} could not be loaded ({exc})")] * len(group)
            else:
                try:
                    outcomes = runner.generate(group)
                finally:
                    self.pool.release(name)
            for index, outcome in zip(indexes, outcomes):
                results[index] = GeneratedImages.of(requests[index], outcome)
        self._count_loaded()
        return results

    @bentoml.api
    async def progress(self) -> Annotated[dict[str, list[int]], JSON]:
        """(steps done, steps in all, partial images decoded) of each job in the running call, by job id."""
        return {str(job): [*steps, len(runner.previews(job))]
                for runner in self.pool.runners() for job, steps in runner.progress().items()}

    @bentoml.api
    async def previews(self, job: int, since: int = 0) -> Annotated[list[bytes], JSON]:
        """A running job's partial images from the `since`-th on, as raw RGB of its size."""
        return raw([image for runner in self.pool.runners() for image in runner.previews(job, since)])

    @bentoml.api
    async def cancel(self, jobs: list[int]) -> bool:
        """Stop the running call at its next step if all its jobs are cancelled. Async, so it runs
        on the worker's event loop while `generate` holds the worker's one sync thread."""
        for runner in self.pool.runners():
            runner.cancel(jobs)
        return True

    @bentoml.api
    async def load(self, model: str) -> str:
        """Start loading a model of the registry if it is not loaded (in a thread: calls for loaded
        models go on): "loaded", "loading", or "failed: <why>"."""
        state = self.pool.start_loading(model)
        self._count_loaded()
        return state

    @bentoml.api
    async def adapters(self) -> Annotated[dict[str, dict[str, str]], JSON]:
        """Each model's LoRA adapters and their status ("ok", "not checked yet", or why one is unavailable);
        a model not loaded lists its folder's files, not checked yet."""
        loaded = self.pool.loaded_runners()
        status = {}
        for model in settings.served_models:
            if model.name in loaded:
                status[model.name] = await asyncio.to_thread(loaded[model.name].adapter_status)
            else:
                status[model.name] = Adapters(None, model.entry.loras_dir).seen()
        return status

    @bentoml.api
    async def loaded(self) -> Annotated[dict[str, int], JSON]:
        """The models loaded now, with their weights' bytes."""
        self._count_loaded()
        return self.pool.loaded()

    def _count_loaded(self) -> None:
        loaded = self.pool.loaded()
        for model in settings.served_models:
            MODEL_LOADED.labels(model=model.name).set(int(model.name in loaded))
            MODEL_WEIGHTS_BYTES.labels(model=model.name).set(loaded.get(model.name, 0))


class DiffusionClient:
    """`DiffusionService` as the process queue uses it (`t2i_task.jobs.model_service.Model`), over
    BentoML's client between the two services (looked up at each call: BentoML sets it up
    after the API service is built)."""

    def __init__(self, service: Callable[[], Any], max_batch: int, calls_in_flight: int,
                 sent: Callable[[list[GenerationRequest]], Awaitable[None]]) -> None:
        self.service = service
        self.calls = CallBatcher(self._generate, max_batch, calls_in_flight, sent=sent, key=GenerationRequest.batch_key)

    async def generate(self, request: GenerationRequest, priority: int = 0, owner: str = "") -> GenerationResult:
        """One request, in the next call to the model's batcher (t2i_task/jobs/model_calls.py), where
        lower priorities go first and owners take turns."""
        REQUESTS_AT_MODEL.inc()
        try:
            return await self.calls.submit(request, rank=priority, owner=owner)
        finally:
            REQUESTS_AT_MODEL.dec()

    async def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        try:
            generated = await self.service().to_async.generate(requests)
        except aiohttp.ClientConnectionError as exc:
            # The model's worker is stopping (SIGTERM reaches it and this process
            # at once) or restarting after a crash.
            raise ModelUnavailable(f"The model service is unavailable ({type(exc).__name__}).") from exc
        return [images.result() for images in generated]

    async def progress(self) -> dict[int, tuple[int, int, int]]:
        reported = await asyncio.wait_for(self.service().to_async.progress(), MODEL_CONTROL_TIMEOUT_S)
        return {int(job): (steps[0], steps[1], steps[2]) for job, steps in reported.items()}

    async def previews(self, job: int, since: int, size: tuple[int, int]) -> list[Image.Image]:
        """A running job's partial images from the `since`-th on ([] if the model cannot say now)."""
        try:
            pixels = await asyncio.wait_for(self.service().to_async.previews(job, since), MODEL_CONTROL_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("previews of %s unavailable: %s", job, type(exc).__name__)
            return []
        return [Image.frombytes("RGB", size, data) for data in pixels]

    async def load(self, name: str) -> str:
        return await asyncio.wait_for(self.service().to_async.load(name), MODEL_CONTROL_TIMEOUT_S)

    async def loaded(self) -> dict[str, int]:
        return await asyncio.wait_for(self.service().to_async.loaded(), MODEL_CONTROL_TIMEOUT_S)

    async def adapters(self) -> dict[str, dict[str, str]]:
        return await asyncio.wait_for(self.service().to_async.adapters(), MODEL_CONTROL_TIMEOUT_S)

    async def cancel(self, jobs: list[int]) -> None:
        """Tell the model service these jobs are cancelled; if it cannot be reached, their call
        simply runs to its end and its images are dropped."""
        try:
            await asyncio.wait_for(self.service().to_async.cancel(jobs), MODEL_CONTROL_TIMEOUT_S)
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("could not tell the model service to cancel %s: %s", jobs, type(exc).__name__)


# The API reference at /docs with Swagger UI's files from the fastapi-offline package (FastAPI's
# own loads them from a CDN); no ReDoc.
app = FastAPIOffline(
    title="t2i-task",
    description="DashAI's TextToImageGenerationTask: DashAI generative API and OpenAI-compatible Images API.",
    version="0.1.0",
    docs_url=page.API_REFERENCE,
    redoc_url=None,
    static_url=page.API_REFERENCE + "/assets",
)
for api in (dashai, dashai_jobs, dashai_components, openai, openai_files, openai_batches, usage):
    app.include_router(api.router)
dashai_front_end = DashAIFrontEnd(settings.serving.dashai_front_end)  # at /app/, with its root assets
dashai_front_end.install(app)
page.install(app)  # this server's own page at /, its files under /ui/
install_error_handlers(app)


@bentoml.service(
    name="t2i",
    traffic={"timeout": settings.serving.request_timeout_s, "max_concurrency": settings.serving.max_concurrency},
)
@bentoml.asgi_app(app, path="/")
class TextToImageService:
    diffusion = bentoml.depends(DiffusionService)

    def __init__(self) -> None:
        store = Store(settings.storage.database_url, settings.storage.images_dir)
        task = TextToImageGenerationTask(max_prompt_length=settings.limits.max_prompt_length)
        self.queue = ProcessQueue(store, task, settings, DiffusionClient(
            lambda: self.diffusion, settings.batching.max_batch_size, settings.batching.calls_in_flight,
            sent=lambda requests: self.queue.calls_sent(requests)),  # their processes are started then
            report_stored=report_stored)
        secret = settings.serving.url_secret
        links = LinkSigner(secret.get_secret_value() if secret else store.shared_secret(SECRET_NAME),
                           settings.serving.image_links_s, settings.serving.public_url)
        self.backend = Backend(settings=settings, store=store, task=task, queue=self.queue, links=links)
        app.state.backend = self.backend  # what the routes work with (t2i_task/api/backend.py)
        self._resuming: asyncio.Task | None = None

    @bentoml.on_startup
    async def resume_interrupted_work(self) -> None:
        # BentoML sets up the client of the model service only after the startup
        # hooks, and the model may still be loading: resuming work here would fail
        # it. Resume in the background once the model answers.
        self._resuming = asyncio.create_task(self._resume_when_model_ready())

    async def _resume_when_model_ready(self) -> None:
        while not ("generate" in getattr(self.diffusion, "endpoints", {}) and await self._model_ready()):
            await asyncio.sleep(MODEL_READY_POLL_S)
        await self.queue.start()

    async def _model_ready(self) -> bool:
        try:
            return await self.diffusion.is_ready(5)
        except (aiohttp.ClientError, TimeoutError):  # still loading: is_ready's own timeout raises
            return False

    @bentoml.on_shutdown
    async def drain(self) -> None:
        """SIGTERM: running generations finish, the rest go back to the queue."""
        if self._resuming:
            self._resuming.cancel()
        await self.queue.drain()
        self.backend.store.close()


# In this order, outermost first: every request gets an answer even if its handler raises,
# CORS answers browsers' preflights (they carry no key), a request without a valid key is
# refused before its body is read, and errors of routes nobody matched are JSON like every
# other error.
TextToImageService.add_asgi_middleware(AnswerFailuresMiddleware)
if settings.serving.cors_origins:
    TextToImageService.add_asgi_middleware(
        CORSMiddleware, allow_origins=settings.serving.cors_origins, allow_methods=["*"], allow_headers=["*"],
        allow_credentials="*" not in settings.serving.cors_origins,
    )
TextToImageService.add_asgi_middleware(ApiKeyMiddleware, keys=KeyRing(settings.serving.api_keys,
                                                                       settings.serving.api_keys_file),
                                       public=lambda path: dashai_front_end.is_public(path) or page.is_public(path),
                                       signed=is_signed_image_request)
TextToImageService.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=settings.serving.max_body_bytes,
                                       route_limits={openai_files.UPLOAD_PATH: settings.bulk.max_file_bytes})
TextToImageService.add_asgi_middleware(JsonRouteErrorsMiddleware)
