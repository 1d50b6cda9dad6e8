"""DashAI's generative API: sessions hold parameters, processes hold one prompt each.

A process is stored DELIVERED and answered at once; the queue generates it in
the background (STARTED, then FINISHED with its image names or ERROR with the
reason). The images are served by name from the images folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i_task.api.backend import Backend, BackendDep, OwnerDep
from t2i_task.api.dashai_parameters import (check_adapters, generation_parameters, served_model, session_model,
                                            session_parameters, switched_parameters)
from t2i_task.api.errors import ApiError, admission, validation_error
from t2i_task.config.parameters import CleanText
from t2i_task.generation.previews import MAX_PARTIAL_IMAGES
from t2i_task.jobs.failures import ProcessEnded
from t2i_task.storage.store import DuplicateSessionName
from t2i_task.storage.tables import GenerativeProcess, GenerativeSession, ProcessData, RunStatus
from t2i_task.task import IMAGE_TYPE, TextToImageGenerationTask, encode_picture

TASK_NAME = TextToImageGenerationTask.__name__
MAX_ID = 2**31 - 1  # PostgreSQL's integer primary keys
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
MAX_PAGE = 1000
Limit = Annotated[int | None, Query(ge=1, le=MAX_PAGE, description=f"At most this many (1-{MAX_PAGE}); none: all.")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="Skip this many first.")]
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.png$")
# How often an event stream looks at its process: about as often as progress changes (t2i_task/jobs/progress.py).
EVENTS_POLL_S = 0.5

router = APIRouter()


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # DashAI ignores keys it does not know

    task_name: str
    name: CleanText = Field(min_length=1, max_length=255)
    model_name: str | None = Field(default=None, description="Omitted: the served model.")
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: CleanText | None = Field(default=None, max_length=10_000)


class SessionsDelete(BaseModel):
    ids: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(min_length=1)


class ProcessCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: int = Field(ge=1, le=MAX_ID)
    input: list[str] = Field(min_length=1)
    # Not in DashAI's API: the page at / asks for previews on the process's event stream.
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES, description=(
        "Partial images of each image to send on the process's event stream while it is drawn."))


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


def process_json(backend: Backend, process: GenerativeProcess, as_base64: bool = False) -> dict[str, Any]:
    output = backend.task.process_output_from_database(process.output)
    if as_base64:  # the early DashAI answer: each PNG's bytes inline, read wherever images are kept
        try:
            output = [ProcessData(id=row.id, data=base64.b64encode(backend.store.images.read(row.data)).decode("ascii"),
                                  data_type=row.data_type) if row.data_type == IMAGE_TYPE else row for row in output]
        except FileNotFoundError as exc:
            raise ApiError(404, f"An image of process {process.id} is missing: {exc}") from exc
    return {
        "id": process.id,
        "session_id": process.session_id,
        "status": int(process.status),
        "created": _iso(process.created),
        "last_modified": _iso(process.last_modified),
        "delivery_time": _iso(process.delivery_time),
        "start_time": _iso(process.start_time),
        "end_time": _iso(process.end_time),
        "input": rows_json(backend.task.process_input_from_database(process.input)),
        "output": rows_json(output),
        # Not in DashAI's answer (its front end ignores it): denoising steps done and in all.
        "progress": progress_json(backend.queue.progress.of(process)),
    }


def progress_json(steps: tuple[int, int] | None) -> dict[str, int] | None:
    return {"step": steps[0], "total": steps[1]} if steps else None


# Sessions

@router.post("/api/v1/generative-session/", status_code=201)
@router.post("/api/v1/generative-session", status_code=201, include_in_schema=False)
async def create_session(body: SessionCreate, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    if body.task_name != TASK_NAME:
        raise ApiError(400, f"Task {body.task_name} is not registered.", param="task_name")
    model = served_model(backend, body.model_name)
    parameters = session_parameters(model, body.parameters)
    await check_adapters(backend, model, parameters)
    try:
        session = await backend.db(
            backend.store.create_session,
            task_name=TASK_NAME,
            model_name=model.name,
            name=body.name,
            parameters=parameters,
            description=body.description,
            account=owner.account,
        )
    except DuplicateSessionName as exc:
        raise ApiError(409, str(exc), param="name") from exc
    return session_json(session)


@router.get("/api/v1/generative-session/")
@router.get("/api/v1/generative-session", include_in_schema=False)
async def list_sessions(backend: BackendDep, owner: OwnerDep, limit: Limit = None,
                        offset: Offset = 0) -> list[dict[str, Any]]:
    """Every session of the caller, oldest first (DashAI's front end asks for all); `limit` and `offset` page
    through them."""
    return [session_json(s) for s in await backend.db(backend.store.list_sessions, limit, offset, owner.scope)]


@router.delete("/api/v1/generative-session/", status_code=204)
@router.delete("/api/v1/generative-session", status_code=204, include_in_schema=False)
async def delete_sessions(body: SessionsDelete, backend: BackendDep, owner: OwnerDep) -> Response:
    """DashAI's bulk delete: the sessions, their processes and their image files (all or, if one is
    missing, none)."""
    await backend.db(backend.store.delete_sessions, body.ids, owner.scope)
    return Response(status_code=204)


@router.get("/api/v1/generative-session/{session_id}")
async def get_session(session_id: RowId, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    return session_json(await backend.db(backend.store.get_session, session_id, owner.scope))


@router.patch("/api/v1/generative-session/{session_id}")
async def update_session(
    session_id: RowId,
    backend: BackendDep,
    owner: OwnerDep,
    name: Annotated[CleanText | None, Query(min_length=1, max_length=255)] = None,
    description: Annotated[CleanText | None, Query(max_length=10_000)] = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Rename, describe or switch model, as DashAI's front end sends it: query parameters, no body.
    A new model takes effect on the session's next process; parameters left at the old model's
    defaults take the new model's, and one set that the new model cannot take is a 422 naming it."""
    parameters = None
    if model_name is not None:
        session = await backend.db(backend.store.get_session, session_id, owner.scope)
        new = served_model(backend, model_name)
        model_name = new.name  # an alias names its model
        parameters = switched_parameters(session_model(backend, session), new, session.parameters or {})
    try:
        session = await backend.db(backend.store.update_session, session_id, name=name, description=description,
                                   model_name=model_name, parameters=parameters, scope=owner.scope)
    except DuplicateSessionName as exc:
        raise ApiError(409, str(exc), param="name") from exc
    return session_json(session)


@router.delete("/api/v1/generative-session/{session_id}", status_code=204)
async def delete_session(session_id: RowId, backend: BackendDep, owner: OwnerDep) -> Response:
    await backend.db(backend.store.delete_sessions, [session_id], owner.scope)
    return Response(status_code=204)


@router.put("/api/v1/generative-session/{session_id}/parameters")
async def update_parameters(
    session_id: RowId,
    backend: BackendDep,
    owner: OwnerDep,
    body: Annotated[dict[str, Any], Body(description="The changed values, bare (DashAI's front end) or as "
                                                    "`{\"parameters\": {...}}`.")],
) -> dict[str, Any]:
    """Merge the changed values into the session's parameters (`{**old, **new}`, as DashAI does)."""
    changes = body["parameters"] if set(body) == {"parameters"} and isinstance(body["parameters"], dict) else body
    session = await backend.db(backend.store.get_session, session_id, owner.scope)
    model = session_model(backend, session)
    parameters = session_parameters(model, {**(session.parameters or {}), **changes})
    await check_adapters(backend, model, parameters)
    return session_json(await backend.db(backend.store.update_session_parameters, session_id, parameters, owner.scope))


@router.get("/api/v1/generative-session/parameters-history/{session_id}")
async def parameters_history(session_id: RowId, backend: BackendDep, owner: OwnerDep) -> list[dict[str, Any]]:
    """Each recorded change as DashAI's front end shows it: which parameter went from what to what."""
    history = await backend.db(backend.store.get_parameter_history, session_id, owner.scope)
    entries, before = [], {}
    for record in history:
        after = record.parameters or {}
        changes = [{"parameter": key, "oldValue": before.get(key), "newValue": after.get(key)}
                   for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
        if before and changes:  # the first row is the session's creation, not a change
            entries.append({"id": record.id, "timestamp": record.modified_at.isoformat(), "changes": changes})
        before = after
    return entries


# Processes


@router.post("/api/v1/generative-process/", status_code=201, openapi_extra=PROCESS_BODY_SCHEMA)
@router.post("/api/v1/generative-process", status_code=201, include_in_schema=False)
async def create_process(request: Request, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    """JSON `{session_id, input: [prompt]}` or DashAI's form (`session_id`, `text_0`)."""
    body = await _process_body(request)
    with admission():
        backend.queue.admit()  # refuse before any validation work
        await backend.check_share(owner)
    try:
        inputs = backend.task.prepare_input_for_database(body.input)
    except ValueError as exc:
        raise ApiError(422, f"input: {exc}", param="input") from exc
    session = await backend.db(backend.store.get_session, body.session_id, owner.scope)
    model = session_model(backend, session)
    params = generation_parameters(model, session)
    await check_adapters(backend, model, params.model_dump())
    with admission():
        process = await backend.queue.submit(session.id, inputs, model, params, body.partial_images)
    return process_json(backend, process)


async def read_form_or_json(request: Request) -> Any:
    """The body as DashAI's front end sends it (a form, as a dict) or as a script sends it (JSON)."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return dict(await request.form())
        return await request.json()
    except StarletteHTTPException:
        raise  # e.g. 413 from the body size limit
    except Exception as exc:
        raise ApiError(400, f"Request body is not valid JSON or form data: {exc}") from exc


async def _process_body(request: Request) -> ProcessCreate:
    data = await read_form_or_json(request)
    if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        texts = [data[key] for key in sorted(k for k in data if k.startswith("text_"))]
        data = {"session_id": data.get("session_id"), "input": texts}
    try:
        return ProcessCreate.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


@router.get("/api/v1/generative-process/file/{filename}")
@router.get("/api/v1/generative-process/image/{filename}")
async def get_image(filename: str, request: Request, backend: BackendDep, owner: OwnerDep) -> Response:
    """A generated PNG by its bare name (`/file/` in DashAI's current front end, `/image/` in older
    ones), from wherever images are kept: any replica serves any image. With keys on, the caller's
    own images, or any image by a signed link (t2i_task/api/links.py: 403 if altered or expired)."""
    missing = ApiError(404, f"Image {filename!r} does not exist.", param="filename")
    if "signature" in request.query_params:
        backend.links.check(request.url.path, request.query_params)
    elif owner.scope is not None and not await backend.db(backend.store.image_in_scope, filename, owner.scope):
        raise missing
    if not IMAGE_NAME.match(filename):  # a bare name only
        raise missing
    images = backend.store.images
    path = images.path(filename)
    if path is not None:  # a local folder: no symlink out of it
        if path.is_symlink() or not path.is_file():
            raise missing
        return FileResponse(path, media_type="image/png")
    if backend.settings.storage.signed_image_links_s:
        return RedirectResponse(images.signed_url(filename, backend.settings.storage.signed_image_links_s))
    try:
        return Response(await backend.db(images.read, filename), media_type="image/png")
    except FileNotFoundError:
        raise missing from None


@router.get("/api/v1/generative-process/session/{session_id}")
async def list_processes(session_id: RowId, backend: BackendDep, owner: OwnerDep, base64: bool = False,
                         limit: Limit = None, offset: Offset = 0) -> list[dict[str, Any]]:
    """A session's processes, oldest first (all, as DashAI's chat asks); `limit` and `offset` page through them."""
    return [process_json(backend, p, base64)
            for p in await backend.db(backend.store.list_processes, session_id, limit, offset, owner.scope)]


@router.get("/api/v1/generative-process/{process_id}")
async def get_process(process_id: RowId, backend: BackendDep, owner: OwnerDep, base64: bool = False) -> dict[str, Any]:
    return process_json(backend, await backend.db(backend.store.get_process, process_id, owner.scope), base64)


@router.get("/api/v1/generative-process/{process_id}/events")
async def process_events(process_id: RowId, backend: BackendDep, owner: OwnerDep) -> EventSourceResponse:
    """Server-sent events: `{"id", "status", "progress"}` on each change, closed after the final
    status (3 or 4); a process already ended gets that one event. A process created with
    `partial_images` also gets `{..., "partial_image_index", "preview"}` (a PNG data URL) for each
    partial image, when this replica runs it."""
    first = await backend.db(backend.store.get_process, process_id, owner.scope)  # 404 before the stream opens

    async def changes():
        process, last, previews = first, None, 0
        while True:
            state = {"id": process.id, "status": int(process.status),
                     "progress": progress_json(backend.queue.progress.of(process))}
            if state != last:
                yield {"data": json.dumps(state)}
                last = state
            for image in await backend.queue.process_previews(process, previews):
                preview = "data:image/png;base64," + encode_picture(image, "png")
                yield {"data": json.dumps({**state, "partial_image_index": previews, "preview": preview})}
                previews += 1
            if process.status in (RunStatus.FINISHED, RunStatus.ERROR):
                return
            await asyncio.sleep(EVENTS_POLL_S)
            process = await backend.db(backend.store.get_process, process_id)

    return EventSourceResponse(changes())


@router.post("/api/v1/generative-process/{process_id}/cancel", status_code=202)
async def cancel_process(process_id: RowId, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    """End a queued or running process as ERROR "Error details: cancelled" (409 once it has ended)."""
    await backend.db(backend.store.get_process, process_id, owner.scope)  # another's: 404
    try:
        process = await backend.queue.cancel(process_id)
    except ProcessEnded as exc:
        raise ApiError(409, str(exc)) from exc
    return process_json(backend, process)


@router.delete("/api/v1/generative-process/{process_id}", status_code=204)
async def delete_process(process_id: RowId, backend: BackendDep, owner: OwnerDep) -> Response:
    """Delete a process with its rows; a queued or running one is cancelled first."""
    await backend.db(backend.store.get_process, process_id, owner.scope)  # another's: 404, nothing cancelled
    if process_id in backend.queue.pending:
        with contextlib.suppress(ProcessEnded):
            await backend.queue.cancel(process_id)
    await backend.db(backend.store.delete_process, process_id, owner.scope)
    return Response(status_code=204)


@router.get("/api/v1/task/metadata")
async def task_metadata() -> dict[str, Any]:
    return TextToImageGenerationTask.get_metadata()
