"""DashAI's job API, over this server's processes: one job per generative process, with
the process's id.

DashAI creates a process and then queues it with `POST /api/v1/job/`; this server
queues every process as soon as it is stored (so plain HTTP clients need no second
call), which makes that call a confirmation: it checks the process and answers its
job. The job list and `changes` feed DashAI's "Job Queue" widget on every page.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response

from t2i_task.api.backend import Backend, BackendDep, OwnerDep
from t2i_task.api.dashai import MAX_ID, Limit, Offset, RowId, read_form_or_json
from t2i_task.api.errors import ApiError
from t2i_task.jobs.failures import ProcessEnded
from t2i_task.jobs.processes import CANCELLED
from t2i_task.storage.scope import in_scope
from t2i_task.storage.store import ERROR_PREFIX, ProcessNotFound
from t2i_task.storage.tables import GenerativeProcess, RunStatus

router = APIRouter()

JOB_TYPE = "GenerativeJob"
LISTED_JOBS = 200  # the widget shows recent work, not the whole history
JOB_STATUS = {
    RunStatus.NOT_STARTED: "not_started",
    RunStatus.DELIVERED: "not_started",
    RunStatus.STARTED: "started",
    RunStatus.FINISHED: "finished",
    RunStatus.ERROR: "error",
}
CANCELLED_OUTPUT = ERROR_PREFIX + CANCELLED  # a cancelled process ends ERROR with this row; its job is "cancelled"
# DashAI's own timestamp format for `since` and `cursor`: UTC, milliseconds, no zone.
DASHAI_TIME = "%Y-%m-%d %H:%M:%S.%f"


def _dashai_time(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime(DASHAI_TIME)[:-3] if moment else None


def job_json(backend: Backend, process: GenerativeProcess) -> dict[str, Any]:
    error = next((row.data for row in process.output if row.data.startswith(ERROR_PREFIX)), None)
    cancelled = error == CANCELLED_OUTPUT
    steps = backend.queue.progress.of(process)
    return {
        "id": process.id,
        "task_type": JOB_TYPE,
        "job_name": f"Generative process {process.id}",
        "generative_process_id": process.id,
        "enqueued_at": _dashai_time(process.delivery_time or process.created),
        "status": "cancelled" if cancelled else JOB_STATUS[process.status],
        "last_update": _dashai_time(process.last_modified),
        "error_msg": error.removeprefix(ERROR_PREFIX) if error and not cancelled else None,
        # DashAI's job progress: a percentage and a line to show beside it.
        "progress": 100 if process.status is RunStatus.FINISHED else (100 * steps[0] // steps[1] if steps else None),
        "progress_message": f"step {steps[0]}/{steps[1]}" if steps else None,
    }


@router.post("/api/v1/job/", status_code=201)
@router.post("/api/v1/job", status_code=201, include_in_schema=False)
async def create_job(request: Request, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    """DashAI's multipart `job_type=GenerativeJob`, `kwargs={"generative_process_id": id}` (JSON also
    accepted). The process is queued already; asking again leaves it queued once."""
    body = await read_form_or_json(request)
    job_type = body.get("job_type") if isinstance(body, dict) else None
    if job_type != JOB_TYPE:
        raise ApiError(400, f"job_type {job_type!r} is not served here; this server runs {JOB_TYPE} only.",
                       param="job_type")
    kwargs = body.get("kwargs", {})
    try:
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
    except ValueError as exc:
        raise ApiError(400, f"kwargs is not valid JSON: {exc}", param="kwargs") from exc
    process_id = kwargs.get("generative_process_id") if isinstance(kwargs, dict) else None
    if not isinstance(process_id, int) or isinstance(process_id, bool) or not 1 <= process_id <= MAX_ID:
        raise ApiError(422, "kwargs.generative_process_id: a process id (positive integer) is required",
                       param="kwargs.generative_process_id")
    process = await backend.db(backend.store.get_process, process_id, owner.scope)
    return {"id": process.id, **job_json(backend, process)}


@router.get("/api/v1/job/")
@router.get("/api/v1/job", include_in_schema=False)
async def list_jobs(backend: BackendDep, owner: OwnerDep, limit: Limit = None,
                    offset: Offset = 0) -> list[dict[str, Any]]:
    """The caller's newest jobs first: LISTED_JOBS of them by default, as DashAI's widget wants; `limit` and
    `offset` page further back."""
    return [job_json(backend, p) for p in await backend.db(backend.store.list_recent_processes,
                                                           limit or LISTED_JOBS, None, offset, owner.scope)]


@router.get("/api/v1/job/changes")
async def job_changes(backend: BackendDep, owner: OwnerDep, since: str | None = None) -> dict[str, Any]:
    """The jobs changed after `since` (DashAI's `YYYY-MM-DD HH:MM:SS.fff`, UTC), and a cursor for the next call."""
    now = datetime.now(UTC)
    moment = None
    if since:
        try:
            moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ApiError(422, f"since: not a timestamp like '2026-11-25 13:00:00.000': {since!r}",
                           param="since") from exc
        moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    changed = await backend.db(backend.store.list_recent_processes, LISTED_JOBS, moment, 0, owner.scope)
    return {
        "jobs": [job_json(backend, p) for p in changed],
        "cursor": _dashai_time(now),
        "server_now": _dashai_time(now),
        "queue_empty": not backend.queue.pending and not backend.queue.answering,
        "recently_completed": any(p.status in (RunStatus.FINISHED, RunStatus.ERROR) for p in changed),
    }


@router.delete("/api/v1/job/all")
async def cancel_all_jobs(backend: BackendDep, owner: OwnerDep) -> dict[str, int]:
    """DashAI's "clear all jobs": every queued or running process of the caller is cancelled (live OpenAI
    calls, whose clients hold them, are left to them); answers how many."""
    cancelled = 0
    for process in await backend.db(backend.store.list_unended_processes):
        if not in_scope(process.account, owner.scope):
            continue
        try:
            await backend.queue.cancel(process.id)
        except (ProcessEnded, ProcessNotFound):  # ended meanwhile, or a live call
            continue
        cancelled += 1
    return {"cancelled": cancelled}


@router.delete("/api/v1/job/{job_id}", status_code=204)
async def cancel_job(job_id: RowId, backend: BackendDep, owner: OwnerDep) -> Response:
    """DashAI's job cancel: the same as `POST /api/v1/generative-process/{id}/cancel` (409 once it has
    ended; the process and its images stay, as DashAI keeps a process whose job is removed)."""
    try:
        await backend.db(backend.store.get_process, job_id, owner.scope)  # another's: 404
        await backend.queue.cancel(job_id)
    except ProcessNotFound as exc:
        raise ApiError(404, f"Job with ID {job_id} does not exist.") from exc
    except ProcessEnded as exc:
        raise ApiError(409, str(exc)) from exc
    return Response(status_code=204)


@router.get("/api/v1/job/{job_id}")
async def get_job(job_id: RowId, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    try:
        process = await backend.db(backend.store.get_process, job_id, owner.scope)
    except ProcessNotFound as exc:
        raise ApiError(404, f"Job with ID {job_id} does not exist.") from exc
    return job_json(backend, process)
