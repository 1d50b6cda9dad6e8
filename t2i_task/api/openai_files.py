"""OpenAI's Files API, for bulk jobs: `POST /v1/files` (a batch's JSONL lines), list, retrieve,
content and delete, in OpenAI's object shapes.

A file's bytes are kept where images are (a local folder or object storage:
t2i_task/storage/files.py), its row in the database, so every replica serves every file.
Uploads have their own body limit (`bulk.max_file_mb`, on this route alone).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import Response

from t2i_task.api.backend import BackendDep, OwnerDep
from t2i_task.api.errors import ApiError
from t2i_task.storage.errors import FileNotFound
from t2i_task.storage.tables import StoredFile

router = APIRouter()
UPLOAD_PATH = "/v1/files"  # the one route whose body may exceed serving.max_body_bytes
COPY_CHUNK = 1 << 20
FILE_ID = re.compile(r"file-[0-9a-f]{32}")  # what this server names files (storage/batch_rows.py, new_id)


def known_file_id(file_id: str) -> str:
    """`file_id` if it could name a file here; FileNotFound (404) before any lookup otherwise."""
    if not FILE_ID.fullmatch(file_id):
        raise FileNotFound(file_id)
    return file_id


def clean_name(filename: str | None) -> str:
    """An uploaded file's bare name without control characters (kept to name it back)."""
    name = "".join(char for char in Path(filename or "").name if char.isprintable())[:255]
    return name or "batch.jsonl"


def file_json(stored: StoredFile) -> dict[str, Any]:
    return {"id": stored.id, "object": "file", "bytes": stored.bytes, "created_at": int(stored.created.timestamp()),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


@router.post(UPLOAD_PATH)
async def upload_file(file: UploadFile, purpose: Annotated[str, Form()], backend: BackendDep,
                      owner: OwnerDep) -> dict[str, Any]:
    """A file of a batch's requests: JSONL, one request a line (checked when a batch is created from it)."""
    if purpose != "batch":
        raise ApiError(400, f"purpose must be 'batch' (this server keeps files for bulk jobs), got {purpose!r}",
                       param="purpose")
    with tempfile.TemporaryDirectory(prefix="t2i-upload-") as folder:
        copy, size = Path(folder) / "upload", 0
        with copy.open("wb") as out:  # spooled by the framework; copied once, not held in memory
            while chunk := await file.read(COPY_CHUNK):
                out.write(chunk)
                size += len(chunk)
        if size == 0:
            raise ApiError(400, "The file is empty: a batch file has one JSON request a line.", param="file")
        stored = await backend.db(backend.store.create_file, purpose, clean_name(file.filename), copy, size,
                                  owner.account)
    return file_json(stored)


@router.get("/v1/files")
async def list_files(
    backend: BackendDep,
    owner: OwnerDep,
    purpose: Literal["batch", "batch_output"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    """The caller's files, newest first (`order=asc`: oldest first); `after` a file id pages on from it."""
    after = known_file_id(after) if after is not None else None
    files = await backend.db(backend.store.list_files, purpose, limit + 1, after, order == "desc", owner.scope)
    data = [file_json(stored) for stored in files[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(files) > limit}


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    return file_json(await backend.db(backend.store.get_file, known_file_id(file_id), owner.scope))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, backend: BackendDep, owner: OwnerDep) -> Response:
    stored = await backend.db(backend.store.get_file, known_file_id(file_id), owner.scope)
    content = await backend.db(backend.store.read_file, file_id)
    return Response(content, media_type="application/jsonl",
                    headers={"Content-Disposition": f'attachment; filename="{stored.filename}"'})


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, backend: BackendDep, owner: OwnerDep) -> dict[str, Any]:
    await backend.db(backend.store.delete_file, known_file_id(file_id), owner.scope)
    return {"id": file_id, "object": "file", "deleted": True}
