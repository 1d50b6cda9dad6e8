"""OpenAI's Batch API for image generation: `POST /v1/batches`, retrieve, cancel, list, and the
batch's images as one zip (`GET /v1/batches/{id}/images`, this server's own).

Creating a batch reads its input file whole: a file that is not JSONL, a line for another
endpoint or a repeated `custom_id` is refused with a 400 naming the line, and nothing is
stored. Each line's body is then checked as `POST /v1/images/generations` checks a live one
(openai.py, `resolve`); a line that fails goes to the error file and never fails the batch.
The batch and all its lines are stored in one transaction and run as stored work at bulk
priority (t2i_task/jobs/batches.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zipfile
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from t2i_task.api.backend import Backend, BackendDep, OwnerDep
from t2i_task.api.errors import ApiError, admission, field_errors
from t2i_task.api.openai_files import known_file_id
from t2i_task.api.openai import ImageGenerationRequest, image_link, resolve, session_id
from t2i_task.jobs.batches import CANCELLED_REASON
from t2i_task.jobs.live import stored_parameters
from t2i_task.storage.batch_rows import BatchCounts, BatchLine, new_id
from t2i_task.storage.errors import BatchNotFound
from t2i_task.storage.process_rows import IMAGE_TYPE
from t2i_task.storage.tables import Batch, RunStatus, utcnow

router = APIRouter()
log = logging.getLogger(__name__)

ENDPOINT = "/v1/images/generations"  # the one endpoint a batch may call here
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")  # what this server names batches (storage/batch_rows.py, new_id)
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}  # OpenAI's one window


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def batch_json(batch: Batch, counts: BatchCounts) -> dict[str, Any]:
    def at(moment):
        return int(moment.timestamp()) if moment else None

    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": None,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": at(batch.created), "in_progress_at": at(batch.in_progress_at),
        "expires_at": at(batch.expires_at), "finalizing_at": at(batch.finalizing_at),
        "completed_at": at(batch.completed_at), "failed_at": at(batch.failed_at), "expired_at": at(batch.expired_at),
        "cancelling_at": at(batch.cancelling_at), "cancelled_at": at(batch.cancelled_at),
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": batch.metadata_,
    }


def known_batch_id(batch_id: str) -> str:
    """`batch_id` if it could name a batch here; BatchNotFound (404) before any lookup otherwise."""
    if not BATCH_ID.fullmatch(batch_id):
        raise BatchNotFound(batch_id)
    return batch_id


async def _answer(backend: Backend, batch: Batch) -> dict[str, Any]:
    counts = await backend.db(backend.store.batch_counts, [batch])
    return batch_json(batch, counts[batch.id])


def read_requests(content: bytes, max_lines: int) -> list[tuple[str, dict[str, Any]]]:
    """A batch file's (custom_id, body) pairs; ApiError 400 naming the first line that is not a request
    to this endpoint, or whose custom_id repeats an earlier one."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The input file is not UTF-8 text (byte {exc.start}): a batch file is JSONL.",
                       param="input_file_id") from None
    requests, seen = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue

        def refuse(why: str) -> ApiError:
            return ApiError(400, f"Line {number} of the input file {why}.", param="input_file_id")

        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise refuse(f"is not JSON ({exc.msg}, column {exc.colno}): a batch file is JSONL") from None
        if not isinstance(line, dict):
            raise refuse("is not a JSON object with custom_id, method, url and body")
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise refuse("has no custom_id (a non-empty string)")
        if len(custom_id) > 512 or "\x00" in custom_id:
            raise refuse("has a custom_id longer than 512 characters or holding a NUL character")
        if line.get("method") != "POST":
            raise refuse(f"has method {line.get('method')!r}; this endpoint takes POST")
        if line.get("url") != ENDPOINT:
            raise refuse(f"names the endpoint {line.get('url')!r}; this batch's is {ENDPOINT}")
        if not isinstance(line.get("body"), dict):
            raise refuse("has no body (a JSON object: the request's parameters)")
        if custom_id in seen:
            raise refuse(f"repeats the custom_id {custom_id!r} of line {seen[custom_id]}")
        seen[custom_id] = number
        requests.append((custom_id, line["body"]))
        if len(requests) > max_lines:
            raise refuse(f"is past the most a batch takes here ({max_lines} requests, bulk.max_lines)")
    if not requests:
        raise ApiError(400, "The input file has no requests: a batch file has one JSON request a line.",
                       param="input_file_id")
    return requests


def batch_line(custom_id: str, body: dict[str, Any], backend: Backend, sessions: dict[str, int],
               links: str, adapters: dict[str, dict[str, str]]) -> BatchLine:
    """One request as stored: to run, with what its answer needs; or refused as a live one would be."""
    fallback = sessions[backend.settings.default_model.name]
    try:
        request = ImageGenerationRequest.model_validate(body)
        if request.stream:
            raise ApiError(400, "stream is not available in a batch: its results are written to a file.",
                           param="stream")
        resolved = resolve(request, backend.settings, backend.task, adapters)
    except ValidationError as exc:
        errors = field_errors(exc)
        message = "; ".join(f"{field}: {text}" for field, text in errors)
        return BatchLine(custom_id, fallback, error=message,
                         parameters={"answer": {"status_code": 400, "param": errors[0][0], "code": "invalid_value"}})
    except ApiError as exc:
        return BatchLine(custom_id, fallback, error=exc.message, parameters={"answer": {
            "status_code": exc.status, "param": exc.param, "code": "invalid_value"}})
    # Bytes unless links are asked for: a batch's results outlive the images' links when retention is on.
    answer = {"response_format": "url" if request.response_format == "url" else "b64_json",
              "output_format": request.output_format or "png", "output_compression": request.output_compression,
              "echo": resolved.echo, "links": links}
    return BatchLine(custom_id, sessions[resolved.model.name], resolved.inputs,
                     parameters={**stored_parameters(resolved.model, resolved.params), "answer": answer})


@router.post("/v1/batches")
async def create_batch(body: BatchCreate, request: Request, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    if body.endpoint != ENDPOINT:
        raise ApiError(400, f"endpoint must be {ENDPOINT!r}: this server's batches generate images; got "
                            f"{body.endpoint!r}", param="endpoint")
    if body.completion_window not in COMPLETION_WINDOWS:
        raise ApiError(400, f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}, got "
                            f"{body.completion_window!r}", param="completion_window")
    with admission():
        backend.queue.admit(counted=False)  # refused while draining or short of disk; its lines wait in the database
    stored = await backend.db(backend.store.get_file, known_file_id(body.input_file_id), owner.scope)
    if stored.purpose != "batch":
        raise ApiError(400, f"File {stored.id} is a {stored.purpose} file; a batch reads a file uploaded with "
                            "purpose 'batch'.", param="input_file_id")
    content = await backend.db(backend.store.read_file, stored.id)
    requests = await backend.db(read_requests, content, backend.settings.bulk.max_lines)
    # Looked up afresh: a cached session its owner deleted would fail the whole batch.
    sessions = {model.name: await session_id(backend, model, owner, fresh=True)
                for model in backend.settings.served_models}
    links = image_link(request, "", backend)  # unsigned: a batch's results are read long after (with a key)
    adapters = await backend.adapters()
    lines = await backend.db(lambda: [batch_line(custom_id, line, backend, sessions, links, adapters)
                                      for custom_id, line in requests])
    batch = Batch(id=new_id("batch_"), endpoint=ENDPOINT, completion_window=body.completion_window,
                  input_file_id=stored.id, metadata_=body.metadata, account=owner.account)
    batch.expires_at = utcnow() + COMPLETION_WINDOWS[body.completion_window]
    batch = await backend.db(backend.store.create_batch, batch, lines)
    refused = sum(1 for line in lines if line.error)
    log.info("batch %s started: %d requests from %s, %d refused at once", batch.id, len(lines), stored.id, refused)
    backend.queue.work_stored()
    if refused == len(lines):
        backend.queue.line_ended(batch.id)  # nothing to run: its results can be written now
    return await _answer(backend, batch)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    return await _answer(backend, await backend.db(backend.store.get_batch, known_batch_id(batch_id), owner.scope))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    """`cancelling` until the lines running now have stopped, then `cancelled`, with the results
    of the lines that finished; the others go to the error file. An ended batch is answered as it is."""
    await backend.db(backend.store.get_batch, known_batch_id(batch_id), owner.scope)  # another's: 404
    batch = await backend.db(backend.store.end_batch_lines, known_batch_id(batch_id), CANCELLED_REASON)
    await backend.queue.batch_cancelled(batch_id)
    return await _answer(backend, await backend.db(backend.store.get_batch, batch.id))


@router.get("/v1/batches")
async def list_batches(backend: BackendDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> dict[str, Any]:
    """The caller's batches, newest first; `after` a batch id pages on from it."""
    after = known_batch_id(after) if after is not None else None
    batches = await backend.db(backend.store.list_batches, limit + 1, after, owner.scope)
    counts = await backend.db(backend.store.batch_counts, batches[:limit])
    data = [batch_json(batch, counts[batch.id]) for batch in batches[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(batches) > limit}


@router.get("/v1/batches/{batch_id}/images")
async def batch_images(batch_id: str, backend: BackendDep, owner: OwnerDep) -> FileResponse:
    """Every image the batch made so far, as one zip: `<custom_id>-<n>.png` (characters other than
    letters, digits, `.`, `_` and `-` in a custom_id become `_`)."""
    batch = await backend.db(backend.store.get_batch, known_batch_id(batch_id), owner.scope)
    path = await backend.db(_zip_images, backend, batch.id)
    return FileResponse(path, media_type="application/zip", filename=f"{batch.id}_images.zip",
                        background=BackgroundTask(os.unlink, path))


def _zip_images(backend: Backend, batch_id: str) -> str:
    handle, path = tempfile.mkstemp(prefix="t2i-batch-", suffix=".zip")
    os.close(handle)
    try:
        names: set[str] = set()
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed
            for lines in backend.store.batch_lines(batch_id):
                for process in lines:
                    if process.status is not RunStatus.FINISHED:
                        continue
                    images = [row.data for row in process.output if row.data_type == IMAGE_TYPE]
                    for index, image in enumerate(images):
                        name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', process.custom_id)}-{index}.png"
                        if name in names:  # two custom_ids that read the same once cleaned
                            name = f"{process.id}-{name}"
                        names.add(name)
                        archive.writestr(name, backend.store.images.read(image))
    except BaseException:
        os.unlink(path)
        raise
    return path
