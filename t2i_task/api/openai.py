"""OpenAI's Images API: `POST /v1/images/generations` and `GET /v1/models`.

A call is answered when its images exist, or with `stream` as server-sent events
(partial images while it is drawn, then the image); it is also stored as a process
of one session per model, so it shows up beside DashAI's processes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from bentoml.exceptions import BentoMLException
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from t2i_task.api.backend import Backend, BackendDep, Owner, OwnerDep, check_adapters
from t2i_task.api.errors import ApiError, admission, parameters_error, retry_later
from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import MAX_LORA_SCALE, MAX_LORAS, GenerationParameters, ParameterError, lora_text
from t2i_task.config.settings import Settings, UnknownModel
from t2i_task.generation.previews import MAX_PARTIAL_IMAGES
from t2i_task.jobs.failures import ClientGone, GenerationFailed, ModelUnavailable, describe_failure
from t2i_task.jobs.live import Finished, LiveCall
from t2i_task.storage.errors import SessionNotFound
from t2i_task.task import TextToImageGenerationTask, encode_image, encode_picture

T = TypeVar("T")
router = APIRouter()
STREAM_POLL_S = 0.25  # how often a stream looks for new partial images (the model is asked every 0.5 s)


class LoraRef(BaseModel):
    """One adapter of a request: its name (its file's, without .safetensors) and scale."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE)


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` body (every parameter OpenAI documents) plus diffusion extensions.

    Parameters that change nothing for a diffusion model are accepted and documented as such
    (`moderation`: no moderation model runs; `style`, `complexity`, `user`,
    `safety_identifier`); values this server cannot honour are a 400 naming the parameter.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT", e.g. "1024x1024", or "auto" (the model\'s '
                                                       "native size); sizes it does not draw well are drawn inside its "
                                                       "range and resized.")
    response_format: Literal["url", "b64_json"] | None = None
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = None
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict[str, Any] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=MAX_PARTIAL_IMAGES)
    user: str | None = None
    safety_identifier: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    loras: list[LoraRef] | None = Field(default=None, max_length=MAX_LORAS, description=(
        "LoRA adapters of the model (GET /v1/models lists them), each with its scale: "
        "[{\"name\": \"ring\", \"scale\": 0.8}]."))


# `quality` as denoising steps, relative to the served model's default step count (`defaults`):
# low half of it, medium it, high and above twice it, all within `limits.max_steps`.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 2.0, "hd": 2.0, "xhigh": 2.0,
                 "max": 2.0}
QUALITY_NAMES = {"standard": "medium", "auto": "medium", "hd": "high", "xhigh": "high", "max": "high"}


def _refuse_what_cannot_be_honoured(body: ImageGenerationRequest) -> None:
    """400 naming the parameter, for documented values this server does not produce."""
    if body.background == "transparent":
        raise ApiError(400, "background 'transparent' is not supported: the model draws opaque images; "
                            "use 'auto' or 'opaque'.", param="background")
    if body.output_format in ("gif", "svg"):
        raise ApiError(400, f"output_format {body.output_format!r} is not supported; use png, jpeg or webp.",
                       param="output_format")
    for name in ("frame_count", "frame_duration_ms", "svg"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} applies to GIF or SVG output, which this server does not produce.", param=name)
    if body.stream and body.n > 1:
        raise ApiError(400, "stream gives one image a request: send n=1 (or several streamed requests).", param="n")
    if body.output_format not in (None, "png") and body.response_format == "url":
        raise ApiError(400, f"output_format {body.output_format!r} needs response_format 'b64_json' "
                            "(image links serve PNG).", param="output_format")


# OpenAI's image models: clients set up as people leave them send these names (Open WebUI sends
# dall-e-2 when its model field is blank); each reaches a served model.
OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
OPENAI_IMAGE_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")


def served_model(name: str | None, settings: Settings) -> ServedModel:
    """The model a client's `model` names: its id or an alias; OpenAI's own image model names and none
    reach the default model. UnknownModel otherwise."""
    if name is None or name.startswith(OPENAI_IMAGE_MODEL_PREFIXES):
        return settings.default_model
    return settings.served_model(name)


def _model_json(name: str, model: ServedModel, loaded: bool | None = None,
                adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """OpenAI's model object, with what a client needs to ask this model well (extensions)."""
    sizes = model.sizes
    return {
        "id": name, "object": "model", "created": 0, "owned_by": "t2i-task", "root": model.name,
        "sizes": {"native": sizes.native, "min": sizes.min, "max": sizes.max} if sizes else None,
        "defaults": model.defaults.model_dump(exclude={"negative_prompt", "seed"}),
        "aliases": list(model.entry.aliases),
        **({"loaded": loaded} if loaded is not None else {}),
        # Its LoRA adapters (`loras`), each "ok", "not checked yet" or why it is unavailable.
        **({"adapters": [{"name": adapter, "status": status} for adapter, status in adapters.items()]}
           if adapters is not None else {}),
    }


@router.get("/v1/models")
async def list_models(backend: BackendDep) -> dict[str, Any]:
    """Every served model, the default first, with its sizes, defaults and whether it is loaded now."""
    loaded, adapters = await backend.loaded_models(), await backend.adapters()
    return {"object": "list", "data": [_model_json(model.name, model, model.name in loaded, adapters.get(model.name, {}))
                                       for model in backend.settings.served_models]}


@router.get("/v1/models/{name}")
async def get_model(name: str, backend: BackendDep) -> dict[str, Any]:
    """A served model by its name or by any name that reaches it (`root` names the served model)."""
    try:
        model = served_model(name, backend.settings)
        return _model_json(name, model, adapters=(await backend.adapters()).get(model.name, {}))
    except UnknownModel:
        raise ApiError(404, f"The model {name!r} does not exist. {_served_names(backend.settings)}",
                       param="model") from None


def _served_names(settings: Settings) -> str:
    names = [f"{model.name}" + (f" (also {', '.join(model.entry.aliases)})" if model.entry.aliases else "")
             for model in settings.served_models]
    return (f"Served models: {'; '.join(names)}; OpenAI's image model names ({', '.join(OPENAI_IMAGE_MODELS)}) "
            f"reach {settings.default_model.name}.")


@dataclass
class ImagesRequest:
    """A request body resolved: what it runs with, its prompt as stored, and what its answer echoes."""

    model: ServedModel
    params: GenerationParameters
    inputs: list[tuple[str, str]]
    echo: dict[str, str]


def resolve(body: ImageGenerationRequest, settings: Settings, task: TextToImageGenerationTask,
            adapters: dict[str, dict[str, str]]) -> ImagesRequest:
    """Check a body as this endpoint does (ApiError 400 naming the parameter) and resolve it, against
    the models' `adapters` (Backend.adapters); a batch's lines go through it too (openai_batches.py)."""
    try:
        model = served_model(body.model, settings)
    except UnknownModel:
        raise ApiError(400, f"Model {body.model!r} is not served. {_served_names(settings)}", param="model") from None
    _refuse_what_cannot_be_honoured(body)
    params = _parameters(body, model)
    try:
        check_adapters(adapters, model, params.loras)
    except ParameterError as exc:
        raise ApiError(400, str(exc), param="loras") from exc
    try:
        inputs = task.prepare_input_for_database([body.prompt])
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from exc
    # Echoed as OpenAI's GPT image models do; `size` is the size drawn (the images are the size asked).
    drawn = model.drawn(params.width, params.height)
    echo = {"size": f"{drawn[0]}x{drawn[1]}", "quality": QUALITY_NAMES.get(body.quality or "auto", body.quality),
            "output_format": body.output_format or "png", "background": "opaque"}
    return ImagesRequest(model, params, inputs, echo)


def wants_links(body: ImageGenerationRequest) -> bool:
    """OpenAI's defaults: links from DALL-E, bytes from the GPT image models (Open WebUI sends no
    response_format for those and cannot fetch a loopback link); naming an output format asks for bytes."""
    wants_bytes = body.output_format or (body.model or "").startswith(("gpt-image-", "chatgpt-image-"))
    return (body.response_format or ("b64_json" if wants_bytes else "url")) == "url"


def image_link(request: Request, name: str, backend: Backend, owner: Owner | None = None) -> str:
    """The link to an image (serving.public_url or the address the request came to); signed for `owner`
    when a key made the request, so that it loads without one (t2i_task/api/links.py)."""
    base = backend.settings.serving.public_url or str(request.base_url)
    path = f"/api/v1/generative-process/image/{name}"
    if owner is not None and owner.caller is not None:
        return backend.links.link(base, path, owner.account)
    return f"{base.rstrip('/')}{path}"


@router.post("/v1/images/generations", response_model=None)
async def generate_images(
    body: ImageGenerationRequest, request: Request, backend: BackendDep, owner: OwnerDep
) -> dict[str, Any] | EventSourceResponse:
    with admission():
        await backend.check_share(owner)
    resolved = resolve(body, backend.settings, backend.task, await backend.adapters() if body.loras else {})
    model, params, inputs, echo = resolved.model, resolved.params, resolved.inputs, resolved.echo

    if body.stream:
        with admission():
            live = await in_openai_session(backend, model, owner, lambda session: backend.queue.start_live(
                session, inputs, model, params, partial_images=body.partial_images or 0))
        return EventSourceResponse(_stream(live, body, echo, backend))

    with admission():
        try:
            finished = await in_openai_session(backend, model, owner, lambda session: backend.queue.run_now(
                session, inputs, model, params, client_gone=request.is_disconnected))
        except ClientGone as exc:  # nobody reads this answer; 499 as nginx logs it
            raise ApiError(499, str(exc)) from exc
        except (BentoMLException, ModelUnavailable, GenerationFailed, OSError) as exc:
            raise _generation_error(exc) from exc

    if wants_links(body):
        data = [{"url": image_link(request, name, backend, owner)} for name, _ in finished.outputs]
    else:
        data = [{"b64_json": image} for image in _final_images(finished, body, backend)]
    return {"created": int(time.time()), "data": data, **echo, "usage": _usage(finished)}


async def _stream(live: LiveCall, body: ImageGenerationRequest, echo: dict[str, str],
                  backend: Backend) -> AsyncIterator[dict[str, str]]:
    """OpenAI's image stream: `image_generation.partial_image` events as the model decodes
    them, then `image_generation.completed` (or an `error` event). A client that leaves
    cancels the generation."""

    def event(kind: str, **fields: Any) -> dict[str, str]:
        return {"event": kind, "data": json.dumps({"type": kind, **fields, **echo, "created_at": int(time.time())})}

    def partial(image: Image.Image, index: int) -> dict[str, str]:
        b64 = encode_picture(image, echo["output_format"], body.output_compression)
        return event("image_generation.partial_image", b64_json=b64, partial_image_index=index)

    sent = 0
    try:
        while not live.running.done():
            await asyncio.wait({live.running}, timeout=STREAM_POLL_S)
            for image in await backend.queue.previews(live, sent):
                yield partial(image, sent)
                sent += 1
        try:
            finished: Finished = live.running.result()
        except (BentoMLException, ModelUnavailable, GenerationFailed, OSError, asyncio.CancelledError) as exc:
            error = _generation_error(exc)
            yield {"event": "error", "data": json.dumps(
                {"type": "error", "error": {"message": error.message, "type": "server_error", "code": error.status}})}
            return
        for image in finished.previews[sent:]:  # decoded faster than this stream looked for them
            yield partial(image, sent)
            sent += 1
        for image in _final_images(finished, body, backend):
            yield event("image_generation.completed", b64_json=image, usage=_usage(finished))
    finally:
        if not live.running.done():  # the client left
            backend.queue.abandon(live)


def _generation_error(exc: BaseException) -> ApiError:
    """The answer to a generation that ended without images."""
    if isinstance(exc, BentoMLException):
        status = exc.error_code if exc.error_code in (429, 503, 504) else 500
        return retry_later(int(status), f"Generation failed: {describe_failure(exc)}")
    if isinstance(exc, ModelUnavailable):
        return retry_later(503, f"{exc} Retry later.")
    if isinstance(exc, asyncio.CancelledError):
        return retry_later(503, "Generation stopped: the server is stopping. Retry later.")
    return ApiError(500, f"Generation failed: {describe_failure(exc)}")  # the model, or the images folder


def _final_images(finished: Finished, body: ImageGenerationRequest, backend: Backend) -> list[str]:
    """The stored images, base64 in the asked output format."""
    return [encode_image(backend.store.images.read(name), body.output_format or "png", body.output_compression)
            for name, _ in finished.outputs]


def _usage(finished: Finished) -> dict[str, Any]:
    """OpenAI's token usage: the prompt's tokens as the model reads them; a diffusion model
    draws no tokens, so output_tokens is 0."""
    tokens = finished.prompt_tokens
    return {"input_tokens": tokens, "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
            "output_tokens": 0, "total_tokens": tokens}


async def session_id(backend: Backend, model: ServedModel, owner: Owner, fresh: bool = False) -> int:
    """The session that records an owner's OpenAI calls as processes (one per model and owner), looked up
    once (again when `fresh`: its owner may have deleted it)."""
    key = (model.name, owner.account)
    if fresh or key not in backend.openai_sessions:
        session = await backend.db(
            backend.store.get_or_create_session,
            task_name=TextToImageGenerationTask.__name__,
            model_name=model.name,
            name=f"openai-images-{model.name}",
            parameters=model.defaults.model_dump(),
            account=owner.account,
        )
        backend.openai_sessions[key] = session.id
    return backend.openai_sessions[key]


async def in_openai_session(backend: Backend, model: ServedModel, owner: Owner,
                            start: Callable[[int], Awaitable[T]]) -> T:
    """`start(session id)` in the owner's OpenAI session, made again if it was deleted since it was looked up."""
    try:
        return await start(await session_id(backend, model, owner))
    except SessionNotFound:
        return await start(await session_id(backend, model, owner, fresh=True))


def _parameters(body: ImageGenerationRequest, model: ServedModel) -> GenerationParameters:
    overrides: dict[str, Any] = {"num_images_per_prompt": body.n}
    if body.quality is not None:
        factor = QUALITY_STEPS[body.quality]
        steps = round(model.defaults.num_inference_steps * factor)
        overrides["num_inference_steps"] = max(1, min(model.limits.max_steps, steps))
    if body.size == "auto":  # the model's own size (the defaults' where it declares none)
        if model.sizes is not None:
            overrides["width"] = overrides["height"] = model.sizes.native
    elif body.size is not None:
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
        if not match:
            raise ApiError(400, f"size must be 'WIDTHxHEIGHT', e.g. '1024x1024', got {body.size!r}", param="size")
        overrides["width"], overrides["height"] = int(match[1]), int(match[2])
    for field in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed"):
        if getattr(body, field) is not None:
            overrides[field] = getattr(body, field)
    if body.loras:
        overrides["loras"] = lora_text((lora.name, lora.scale) for lora in body.loras)
    try:
        return model.validate_parameters(overrides)
    except ParameterError as exc:
        error = parameters_error(exc)
        param = {"num_images_per_prompt": "n", "width": "size", "height": "size"}.get(error.param, error.param)
        raise ApiError(400, error.message, param=param) from exc
