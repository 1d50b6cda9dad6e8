"""DashAI's own web front end, served by this server at `/app/`: same origin, so no proxy and no CORS.

DashAI's built React app ships inside the `dashai` wheel (`DashAI/front/build`;
`make install` installs that package without its dependencies). Its
`index.html` loads its assets from root paths (`/static/...`, `/manifest.json`,
images), its API calls go to the relative `/api` (this server's DashAI API), and
React Router owns every path under `/app/`. So every path under `/app/` answers
`index.html`, and each entry at the top of the build folder is served at its own
root path, as DashAI's own server does; nothing else of this server is at the root.
`serving.dashai_front_end: false` turns it off. Without the package, `/app/` is a
404 that says what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

from t2i_task.api.errors import ApiError

PREFIX = "/app"
INSTALL = "pip install --no-deps dashai==0.10.0"  # what `make install` runs


def build_folder() -> Path | None:
    """The built front end of the installed `dashai` package, found without importing DashAI
    (its imports need its many dependencies); None if it is not installed."""
    spec = importlib.util.find_spec("DashAI")
    for package in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(package) / "front" / "build"
        if (folder / "index.html").is_file():
            return folder
    return None


class DashAIFrontEnd:
    """Where DashAI's front end is served from (`folder`, None when it is off or missing)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.folder = build_folder() if enabled else None
        top = sorted(self.folder.iterdir()) if self.folder else []
        self.root_files = [entry.name for entry in top if entry.is_file() and entry.name != "index.html"]
        self.root_folders = [entry.name for entry in top if entry.is_dir()]

    def is_public(self, path: str) -> bool:
        """The front end's own paths: a browser loads them without a key (an `<img>`, a `<script>`
        and a page cannot send one)."""
        if not self.folder:
            return False
        first, slash, _ = path.removeprefix("/").partition("/")
        return (path == PREFIX or path.startswith(PREFIX + "/") or (first in self.root_folders if slash
                                                                    else first in self.root_files))

    def install(self, app: FastAPI) -> None:
        app.add_api_route(PREFIX, self._to_app, methods=["GET", "HEAD"], include_in_schema=False)
        app.add_api_route(PREFIX + "/{path:path}", self._index, methods=["GET", "HEAD"], include_in_schema=False)
        if not self.folder:
            return
        for name in self.root_files:
            app.add_api_route(f"/{name}", self._file(self.folder / name), methods=["GET", "HEAD"],
                              include_in_schema=False)
        for name in self.root_folders:
            app.mount(f"/{name}", StaticFiles(directory=self.folder / name), name=f"dashai-{name}")

    async def _to_app(self) -> RedirectResponse:
        return RedirectResponse(PREFIX + "/")

    async def _index(self, path: str) -> FileResponse:
        if self.folder is None:
            if not self.enabled:
                raise ApiError(404, "DashAI's front end is turned off on this server (serving.dashai_front_end).")
            raise ApiError(404, f"DashAI's front end is not installed on this server: install the dashai package "
                                f"into its environment ({INSTALL}; `make install` does), then restart it.")
        # React Router reads the path; index.html is never cached, so a new DashAI is picked up.
        return FileResponse(self.folder / "index.html", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _file(path: Path):
        async def serve() -> FileResponse:
            return FileResponse(path)
        return serve
