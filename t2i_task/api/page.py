"""This server's own page for a person: `/` answers its `index.html`, and its files are under `/ui/`.

The page is plain HTML, CSS and JavaScript modules in `t2i_task/ui/` (no build step): it
generates through DashAI's process API (sessions are its history), so everything it shows
any other client can see too. It loads nothing from another host, and its Content Security
Policy tells the browser to refuse anything that would.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

FOLDER = Path(__file__).resolve().parents[1] / "ui"
PREFIX = "/ui"
# Same origin only; `blob:` for the images the page fetches with the API key and shows.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'self'")
# The API reference (fastapi-offline serves Swagger UI's files under it) and the schema it reads.
API_REFERENCE = "/docs"
SCHEMA = "/openapi.json"


def is_public(path: str) -> bool:
    """The page, its files and the API reference: a browser loads them before it has a key."""
    return (path in ("/", SCHEMA, API_REFERENCE) or path.startswith(PREFIX + "/")
            or path.startswith(API_REFERENCE + "/"))


def install(app: FastAPI) -> None:
    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(PREFIX, StaticFiles(directory=FOLDER), name="page")


async def index() -> FileResponse:
    # Never cached, so a new release's page (and the files it names) is what a reload shows.
    return FileResponse(FOLDER / "index.html", headers={
        "Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY})
