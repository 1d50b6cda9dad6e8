"""OpenAI's Images API: `POST /v1/images/generations` and `GET /v1/models`.

A call is answered when its images exist; it is also stored as a process of
one session per model, so it shows up beside DashAI's processes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from bentoml.exceptions import BentoMLException
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from t2i_task.api.backend import Backend, BackendDep
from t2i_task.api.errors import ApiError, admission, parameters_error, retry_later
from t2i_task.config import GenerationParameters, ParameterError, Settings
from t2i_task.models import ProcessData
from t2i_task.processes import ClientGone, GenerationFailed, ModelUnavailable, describe_failure
from t2i_task.task import TextToImageGenerationTask

router = APIRouter()


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

    if body.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/api/v1/generative-process/image/{name}"} for name, _ in saved]
    else:
        rows = [ProcessData(data=name, data_type=kind, is_input=False) for name, kind in saved]
        shown = backend.task.process_output_from_database(rows, images_path=backend.store.images_dir, as_base64=True)
        data = [{"b64_json": row.data} for row in shown]
    return {"created": int(time.time()), "data": data}


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
    except ParameterError as exc:
        error = parameters_error(exc)
        param = {"num_images_per_prompt": "n", "width": "size", "height": "size"}.get(error.param, error.param)
        raise ApiError(400, error.message, param=param) from exc
