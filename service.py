"""The HTTP surface: DashAI's generative API and OpenAI's Images API over one batched model.

Two BentoML services:

- `DiffusionService` owns the `DiffusionRunner` and exposes one batchable
  `generate`: BentoML's adaptive batcher joins concurrent requests into one
  pipeline call.
- `TextToImageService` speaks HTTP (a FastAPI app mounted at `/`), owns the
  store, the task's adapters and the process queue (`t2i_task/processes.py`),
  and sends every generation, from every endpoint, through
  `DiffusionService.generate`.

A request's path: `prepare_input_for_database` -> store -> `prepare_for_task`
-> `DiffusionService.generate` -> `process_output` (PNG files) -> store ->
`process_output_from_database` on the way back out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import aiohttp
import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i_task.config import CleanText, GenerationParameters, load_settings
from t2i_task.http_guards import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    JsonRouteErrorsMiddleware,
    error_payload,
    is_openai_path,
)
from t2i_task.models import GenerativeProcess, GenerativeSession, ProcessData
from t2i_task.processes import (
    GenerationFailed,
    ModelUnavailable,
    ProcessQueue,
    QueueFull,
    ShuttingDown,
    describe_failure,
)
from t2i_task.runner import DiffusionRunner, GenerationRequest, GenerationResult
from t2i_task.store import DuplicateSessionName, NotFoundError, Store
from t2i_task.task import TextToImageGenerationTask

logger = logging.getLogger("t2i.service")
settings = load_settings()
TASK_NAME = TextToImageGenerationTask.__name__
MODEL_NAME = settings.model.name
RETRY_AFTER_S = 5
MODEL_READY_POLL_S = 0.5
MAX_ID = 2**31 - 1  # PostgreSQL's integer primary keys
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.png$")


class GeneratedImages(BaseModel):
    """One request's images as raw RGB pixels: PNG encoding happens in the API
    process, beside the next batch, not in the model's worker."""

    width: int
    height: int
    pixels: list[bytes]
    seeds: list[int]
    error: str | None = None  # set when this request failed even when run alone

    def images(self) -> list[Image.Image]:
        return [Image.frombytes("RGB", (self.width, self.height), data) for data in self.pixels]


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
)
class DiffusionService:
    def __init__(self) -> None:
        # Loaded before the worker reports ready, so /readyz waits for the model.
        self.runner = DiffusionRunner(
            settings.model.path,
            settings.runtime,
            scheduler=settings.model.scheduler,
            local_files_only=settings.model.local_files_only,
        )

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.batching.max_batch_size,
        max_latency_ms=settings.batching.max_latency_ms,
    )
    def generate(self, requests: list[GenerationRequest]) -> list[GeneratedImages]:
        return [
            GeneratedImages(
                width=request.width,
                height=request.height,
                pixels=[image.convert("RGB").tobytes() for image in result.images],
                seeds=result.seeds,
                error=result.error,
            )
            for request, result in zip(requests, self.runner.generate(requests))
        ]


# HTTP schemas


class ApiError(Exception):
    """A client-facing error: status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_name: str
    name: CleanText = Field(min_length=1, max_length=255)
    model_name: str | None = Field(default=None, description="Omitted: the served model.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: CleanText | None = Field(default=None, max_length=10_000)


class ParametersUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parameters: dict[str, Any]


class ProcessCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: int = Field(ge=1, le=MAX_ID)
    input: list[str] = Field(min_length=1)


# The route reads JSON or a form itself; this tells OpenAPI (and fuzzers) both forms.
PROCESS_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ProcessCreate.model_json_schema()},
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"session_id": {"type": "integer"}, "text_0": {"type": "string"}},
                    "required": ["session_id", "text_0"],
                }
            },
        },
    }
}


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` body plus diffusion extensions."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT", e.g. "512x512".')
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


def session_json(session: GenerativeSession) -> dict[str, Any]:
    return {
        "id": session.id,
        "name": session.name,
        "task_name": session.task_name,
        "model_name": session.model_name,
        "parameters": session.parameters,
        "description": session.description,
        "created": session.created.isoformat(),
        "last_modified": session.last_modified.isoformat(),
    }


def rows_json(rows: list[ProcessData]) -> list[dict[str, Any]]:
    return [{"id": row.id, "data": row.data, "data_type": row.data_type} for row in rows]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def field_errors(exc: ValidationError | RequestValidationError) -> list[tuple[str, str]]:
    """(field, message) pairs; the field is the dotted path without FastAPI's 'body'/'query' prefix."""
    pairs = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if part not in ("body", "query", "path", "form")]
        pairs.append((".".join(location) or "body", error["msg"]))
    return pairs


def parameters_error(exc: ValueError) -> ApiError:
    """A 422 naming the parameter that broke a limit or a type."""
    if isinstance(exc, ValidationError):
        field, message = field_errors(exc)[0]
        return ApiError(422, f"{field}: {message}", param=field)
    field = str(exc).split(" ", 1)[0]
    return ApiError(422, str(exc), param=field)


app = FastAPI(
    title="t2i-task",
    description="DashAI's TextToImageGenerationTask: DashAI generative API and OpenAI-compatible Images API.",
    version="0.1.0",
)


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    body = error_payload(request.url.path, error.status, error.message, param=error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = field_errors(exc)
    message = "; ".join(f"{field}: {text}" for field, text in errors)
    status = 400 if is_openai_path(request.url.path) else 422  # OpenAI answers 400, FastAPI/DashAI 422
    return _error_response(request, ApiError(status, message, param=errors[0][0] if errors else None))


@app.exception_handler(NotFoundError)
async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return _error_response(request, ApiError(404, str(exc)))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))


@app.exception_handler(OperationalError)
@app.exception_handler(InterfaceError)
async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The pool re-checks connections (pool_pre_ping), so the next request after
    # the database returns succeeds: nothing to restart.
    logger.warning("database unavailable: %s", type(exc).__name__)
    return _error_response(
        request, ApiError(503, "Database unavailable; retry later.", headers={"Retry-After": str(RETRY_AFTER_S)})
    )


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Still JSON, in the caller's error shape; the traceback goes to the log.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error_response(request, ApiError(500, f"Internal error: {type(exc).__name__}"))


@bentoml.service(
    name="t2i",
    traffic={"timeout": settings.serving.request_timeout_s, "max_concurrency": settings.serving.max_concurrency},
)
@bentoml.asgi_app(app, path="/")
class TextToImageService:
    diffusion = bentoml.depends(DiffusionService)

    def __init__(self) -> None:
        self.store = Store(settings.storage.database_url, settings.storage.images_dir)
        self.task = TextToImageGenerationTask(max_prompt_length=settings.limits.max_prompt_length)
        self.queue = ProcessQueue(self.store, self.task, settings, self.call_model)
        self.db = self.queue.db
        self._openai_session_id: int | None = None
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
        except aiohttp.ClientError:
            return False

    @bentoml.on_shutdown
    async def drain(self) -> None:
        """SIGTERM: running generations finish, the rest go back to the queue."""
        if self._resuming:
            self._resuming.cancel()
        await self.queue.drain()
        self.store.close()

    @contextmanager
    def admission(self):
        """The queue's refusals as HTTP answers: 429 when full, 503 when shutting down."""
        try:
            yield
        except QueueFull as exc:
            raise ApiError(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc

    async def call_model(self, request: GenerationRequest) -> GenerationResult:
        """One request through the batcher."""
        try:
            [generated] = await self.diffusion.to_async.generate([request])
        except aiohttp.ClientConnectionError as exc:
            # The model's worker is stopping (SIGTERM reaches it and this process
            # at once) or restarting after a crash.
            raise ModelUnavailable(f"The model service is unavailable ({type(exc).__name__}).") from exc
        return GenerationResult(images=generated.images(), seeds=generated.seeds, error=generated.error)

    def process_json(self, process: GenerativeProcess, as_base64: bool = False) -> dict[str, Any]:
        try:
            output = self.task.process_output_from_database(
                process.output, images_path=self.store.images_dir, as_base64=as_base64
            )
        except FileNotFoundError as exc:
            raise ApiError(404, f"An image of process {process.id} is missing: {Path(exc.filename).name}") from exc
        return {
            "id": process.id,
            "session_id": process.session_id,
            "status": int(process.status),
            "created": _iso(process.created),
            "last_modified": _iso(process.last_modified),
            "delivery_time": _iso(process.delivery_time),
            "start_time": _iso(process.start_time),
            "end_time": _iso(process.end_time),
            "input": rows_json(self.task.process_input_from_database(process.input)),
            "output": rows_json(output),
        }

    # DashAI: sessions

    @app.post("/api/v1/generative-session/", status_code=201)
    @app.post("/api/v1/generative-session", status_code=201, include_in_schema=False)
    async def create_session(self, body: SessionCreate) -> dict[str, Any]:
        if body.task_name != TASK_NAME:
            raise ApiError(400, f"Task {body.task_name} is not registered.", param="task_name")
        model_name = body.model_name or MODEL_NAME
        if model_name != MODEL_NAME:
            raise ApiError(400, f"Model {model_name} is not registered. Served: {MODEL_NAME}.", param="model_name")
        try:
            params = settings.validate_parameters(body.parameters)
        except ValueError as exc:
            raise parameters_error(exc) from exc
        try:
            session = await self.db(
                self.store.create_session,
                task_name=TASK_NAME,
                model_name=model_name,
                name=body.name,
                parameters=params.model_dump(),
                description=body.description,
            )
        except DuplicateSessionName as exc:
            raise ApiError(409, str(exc), param="name") from exc
        return session_json(session)

    @app.get("/api/v1/generative-session/")
    @app.get("/api/v1/generative-session", include_in_schema=False)
    async def list_sessions(self) -> list[dict[str, Any]]:
        return [session_json(s) for s in await self.db(self.store.list_sessions)]

    @app.get("/api/v1/generative-session/{session_id}")
    async def get_session(self, session_id: RowId) -> dict[str, Any]:
        return session_json(await self.db(self.store.get_session, session_id))

    @app.put("/api/v1/generative-session/{session_id}/parameters")
    async def update_parameters(self, session_id: RowId, body: ParametersUpdate) -> dict[str, Any]:
        try:
            params = settings.validate_parameters(body.parameters)
        except ValueError as exc:
            raise parameters_error(exc) from exc
        return session_json(await self.db(self.store.update_session_parameters, session_id, params.model_dump()))

    # DashAI: processes

    @app.post("/api/v1/generative-process/", status_code=201, openapi_extra=PROCESS_BODY_SCHEMA)
    @app.post("/api/v1/generative-process", status_code=201, include_in_schema=False)
    async def create_process(self, request: Request) -> dict[str, Any]:
        """JSON `{session_id, input: [prompt]}` or DashAI's form (`session_id`, `text_0`)."""
        body = await self._process_body(request)
        with self.admission():
            self.queue.admit()  # refuse before any validation work
        try:
            inputs = self.task.prepare_input_for_database(body.input)
        except ValueError as exc:
            raise ApiError(422, f"input: {exc}", param="input") from exc
        session = await self.db(self.store.get_session, body.session_id)
        try:
            params = GenerationParameters.model_validate(session.parameters)
        except ValidationError as exc:
            raise ApiError(409, f"Session {session.id} has unusable parameters: {exc}") from exc
        with self.admission():
            process = await self.queue.submit(session.id, inputs, params)
        return self.process_json(process)

    @staticmethod
    async def _process_body(request: Request) -> ProcessCreate:
        content_type = request.headers.get("content-type", "")
        try:
            if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                form = await request.form()
                texts = [form[key] for key in sorted(k for k in form if k.startswith("text_"))]
                data: Any = {"session_id": form.get("session_id"), "input": texts}
            else:
                data = await request.json()
        except StarletteHTTPException:
            raise  # e.g. 413 from the body size limit
        except Exception as exc:
            raise ApiError(400, f"Request body is not valid JSON or form data: {exc}") from exc
        try:
            return ProcessCreate.model_validate(data)
        except ValidationError as exc:
            errors = field_errors(exc)
            raise ApiError(422, "; ".join(f"{f}: {m}" for f, m in errors), param=errors[0][0]) from exc

    @app.get("/api/v1/generative-process/image/{filename}")
    async def get_image(self, filename: str) -> FileResponse:
        path = self.store.images_dir / filename
        # A bare name only, and no symlink out of the images folder.
        if not IMAGE_NAME.match(filename) or path.is_symlink() or not path.is_file():
            raise ApiError(404, f"Image {filename!r} does not exist.", param="filename")
        return FileResponse(path, media_type="image/png")

    @app.get("/api/v1/generative-process/session/{session_id}")
    async def list_processes(self, session_id: RowId, base64: bool = False) -> list[dict[str, Any]]:
        return [self.process_json(p, base64) for p in await self.db(self.store.list_processes, session_id)]

    @app.get("/api/v1/generative-process/{process_id}")
    async def get_process(self, process_id: RowId, base64: bool = False) -> dict[str, Any]:
        return self.process_json(await self.db(self.store.get_process, process_id), base64)

    @app.delete("/api/v1/generative-process/{process_id}")
    async def delete_process(self, process_id: RowId) -> dict[str, Any]:
        await self.db(self.store.delete_process, process_id)
        return {"id": process_id, "deleted": True}

    @app.get("/api/v1/task/metadata")
    async def task_metadata(self) -> dict[str, Any]:
        return TextToImageGenerationTask.get_metadata()

    # OpenAI

    @app.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "t2i-task"}],
        }

    @app.post("/v1/images/generations")
    async def generate_images(self, body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        if body.model is not None and body.model != MODEL_NAME:
            raise ApiError(400, f"Model {body.model!r} is not served. Served models: {MODEL_NAME}.", param="model")
        params = self._openai_parameters(body)
        try:
            inputs = self.task.prepare_input_for_database([body.prompt])
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc

        with self.admission():
            try:
                saved = await self.queue.run_now(await self.openai_session_id(), inputs, params)
            except BentoMLException as exc:
                status = exc.error_code if exc.error_code in (429, 503, 504) else 500
                raise ApiError(int(status), f"Generation failed: {exc}",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
            except ModelUnavailable as exc:
                raise ApiError(503, f"{exc} Retry later.", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
            except (GenerationFailed, OSError) as exc:  # the model, or the images folder
                raise ApiError(500, f"Generation failed: {describe_failure(exc)}") from exc

        if body.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/api/v1/generative-process/image/{name}"} for name, _ in saved]
        else:
            rows = [ProcessData(data=name, data_type=kind, is_input=False) for name, kind in saved]
            shown = self.task.process_output_from_database(rows, images_path=self.store.images_dir, as_base64=True)
            data = [{"b64_json": row.data} for row in shown]
        return {"created": int(time.time()), "data": data}

    async def openai_session_id(self) -> int:
        """The session that records OpenAI calls as processes, looked up once."""
        if self._openai_session_id is None:
            session = await self.db(
                self.store.get_or_create_session,
                task_name=TASK_NAME,
                model_name=MODEL_NAME,
                name=f"openai-images-{MODEL_NAME}",
                parameters=settings.defaults.model_dump(),
            )
            self._openai_session_id = session.id
        return self._openai_session_id

    @staticmethod
    def _openai_parameters(body: ImageGenerationRequest) -> GenerationParameters:
        overrides: dict[str, Any] = {"num_images_per_prompt": body.n}
        if body.size is not None:
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
            if not match:
                raise ApiError(400, f"size must be 'WIDTHxHEIGHT', e.g. '512x512', got {body.size!r}", param="size")
            overrides["width"], overrides["height"] = int(match[1]), int(match[2])
        for field in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed"):
            if getattr(body, field) is not None:
                overrides[field] = getattr(body, field)
        try:
            return settings.validate_parameters(overrides)
        except ValueError as exc:
            error = parameters_error(exc)
            param = {"num_images_per_prompt": "n", "width": "size", "height": "size"}.get(error.param, error.param)
            raise ApiError(400, error.message, param=param) from exc


# In this order, outermost first: a request without a valid key is refused before its
# body is read, and errors of routes nobody matched are JSON like every other error.
TextToImageService.add_asgi_middleware(ApiKeyMiddleware, keys=settings.serving.api_keys)
TextToImageService.add_asgi_middleware(BodySizeLimitMiddleware, max_bytes=settings.serving.max_body_bytes)
TextToImageService.add_asgi_middleware(JsonRouteErrorsMiddleware)
