"""OpenAI's Images API: `POST /v1/images/generations` and `GET /v1/models`.

A call is answered when its images exist; it is also stored as a process of
one session per model, so it shows up beside DashAI's processes.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Literal

from bentoml.exceptions import BentoMLException
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from t2i_task.api.backend import Backend, BackendDep
from t2i_task.api.errors import ApiError, admission, parameters_error, retry_later
from t2i_task.config import GenerationParameters, ParameterError, Settings
from t2i_task.models import ProcessData
from t2i_task.processes import ClientGone, GenerationFailed, ModelUnavailable, describe_failure
from t2i_task.task import TextToImageGenerationTask

router = APIRouter()


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
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT", e.g. "512x512", or "auto" (the defaults).')
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
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = None
    safety_identifier: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


# `quality` as denoising steps, relative to the served model's default step count (`defaults`):
# low half of it, medium it, high and above twice it, all within `limits.max_steps`.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 2.0, "hd": 2.0, "xhigh": 2.0,
                 "max": 2.0}
QUALITY_NAMES = {"standard": "medium", "auto": "medium", "hd": "high", "xhigh": "high", "max": "high"}
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


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
    if body.stream:
        raise ApiError(400, "stream is not supported yet: send the request without it.", param="stream")
    if body.output_format not in (None, "png") and body.response_format == "url":
        raise ApiError(400, f"output_format {body.output_format!r} needs response_format 'b64_json' "
                            "(image links serve PNG).", param="output_format")


@router.get("/v1/models")
async def list_models(backend: BackendDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": backend.settings.model.name, "object": "model", "created": 0, "owned_by": "t2i-task"}],
    }


@router.post("/v1/images/generations")
async def generate_images(body: ImageGenerationRequest, request: Request, backend: BackendDep) -> dict[str, Any]:
    served = backend.settings.model.name
    if body.model is not None and body.model != served:
        raise ApiError(400, f"Model {body.model!r} is not served. Served models: {served}.", param="model")
    _refuse_what_cannot_be_honoured(body)
    params = _parameters(body, backend.settings)
    try:
        inputs = backend.task.prepare_input_for_database([body.prompt])
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from exc

    with admission():
        try:
            saved = await backend.queue.run_now(await _session_id(backend), inputs, params,
                                                client_gone=request.is_disconnected)
        except BentoMLException as exc:
            status = exc.error_code if exc.error_code in (429, 503, 504) else 500
            raise retry_later(int(status), f"Generation failed: {describe_failure(exc)}") from exc
        except ModelUnavailable as exc:
            raise retry_later(503, f"{exc} Retry later.") from exc
        except ClientGone as exc:  # nobody reads this answer; 499 as nginx logs it
            raise ApiError(499, str(exc)) from exc
        except (GenerationFailed, OSError) as exc:  # the model, or the images folder
            raise ApiError(500, f"Generation failed: {describe_failure(exc)}") from exc

    output_format = body.output_format or "png"
    # OpenAI's default: links; a caller that names an output format wants the bytes (gpt-image style).
    if (body.response_format or ("b64_json" if body.output_format else "url")) == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/api/v1/generative-process/image/{name}"} for name, _ in saved]
    else:
        rows = [ProcessData(data=name, data_type=kind, is_input=False) for name, kind in saved]
        shown = backend.task.process_output_from_database(rows, images_path=backend.store.images_dir, as_base64=True)
        data = [{"b64_json": _encoded(row.data, output_format, body.output_compression)} for row in shown]
    return {
        "created": int(time.time()),
        "data": data,
        # Echoed as OpenAI's GPT image models do.
        "size": f"{params.width}x{params.height}",
        "quality": QUALITY_NAMES.get(body.quality or "auto", body.quality),
        "output_format": output_format,
        "background": "opaque",
    }


def _encoded(png_base64: str, output_format: str, compression: int | None) -> str:
    """The task's base64 PNG, in the asked format; `output_compression` is the JPEG/WebP quality
    (100, OpenAI's default, compresses least)."""
    if output_format == "png":
        return png_base64
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(base64.b64decode(png_base64))) as image:
        image.convert("RGB").save(buffer, IMAGE_FORMATS[output_format], quality=100 if compression is None else compression)
    return base64.b64encode(buffer.getvalue()).decode()


async def _session_id(backend: Backend) -> int:
    """The session that records OpenAI calls as processes (one per model)."""
    model = backend.settings.model.name
    if model not in backend.openai_sessions:
        session = await backend.db(
            backend.store.get_or_create_session,
            task_name=TextToImageGenerationTask.__name__,
            model_name=model,
            name=f"openai-images-{model}",
            parameters=backend.settings.defaults.model_dump(),
        )
        backend.openai_sessions[model] = session.id
    return backend.openai_sessions[model]


def _parameters(body: ImageGenerationRequest, settings: Settings) -> GenerationParameters:
    overrides: dict[str, Any] = {"num_images_per_prompt": body.n}
    if body.quality is not None:
        factor = QUALITY_STEPS[body.quality]
        steps = round(settings.defaults.num_inference_steps * factor)
        overrides["num_inference_steps"] = max(1, min(settings.limits.max_steps, steps))
    if body.size is not None and body.size != "auto":  # auto: the model's own size, its defaults
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size)
        if not match:
            raise ApiError(400, f"size must be 'WIDTHxHEIGHT', e.g. '512x512', got {body.size!r}", param="size")
        overrides["width"], overrides["height"] = int(match[1]), int(match[2])
    for field in ("negative_prompt", "num_inference_steps", "guidance_scale", "seed"):
        if getattr(body, field) is not None:
            overrides[field] = getattr(body, field)
    try:
        return settings.validate_parameters(overrides)
    except ParameterError as exc:
        error = parameters_error(exc)
        param = {"num_images_per_prompt": "n", "width": "size", "height": "size"}.get(error.param, error.param)
        raise ApiError(400, error.message, param=param) from exc
