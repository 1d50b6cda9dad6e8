"""Where generated images and bulk-job files are kept: a local folder (the default) or an
S3-compatible bucket.

`ImageFiles` is the one place that writes, reads, lists and deletes those
files (a batch's files are kept in a folder or prefix of their own inside the images', `within`). Object storage goes through obstore: one small wheel with no Python
dependencies, the same calls for any S3-compatible service, the standard AWS
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP` for a plain-HTTP
endpoint) and pre-signed URLs. DashAI's task writes PNGs under a folder it is
given (its contract): `save` gives it this folder when images are local, and a
temporary one on object storage, whose files it uploads and then removes.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from t2i_task.config.settings import OBJECT_STORAGE

log = logging.getLogger(__name__)

def is_object_storage(location: str | Path) -> bool:
    return str(location).startswith(OBJECT_STORAGE)


class ImageFiles:
    def __init__(self, location: str | Path) -> None:
        """`location`: a folder (created if missing) or `s3://bucket/prefix`."""
        self.location = str(location)
        if is_object_storage(location):
            from obstore.store import from_url

            self.folder: Path | None = None
            self._bucket = from_url(self.location)
        else:
            self.folder = Path(location)  # made by the first image written (the task's process_output)

    @property
    def local(self) -> bool:
        return self.folder is not None

    def within(self, name: str) -> ImageFiles:
        """The files kept in a folder (or prefix) of this name inside this one."""
        if self.folder is not None:
            return ImageFiles(self.folder / name)
        return ImageFiles(f"{self.location.rstrip('/')}/{name}")

    def put(self, name: str, source: bytes | Path) -> None:
        """Keep `source` (bytes, or a local file's contents) under the bare `name`, whole or not at all:
        a local file is written beside as `.part` and renamed, an upload is one object."""
        name = Path(name).name
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            part = self.folder / f"{name}.part"
            if isinstance(source, Path):
                shutil.copyfile(source, part)
            else:
                part.write_bytes(source)
            part.replace(self.folder / name)
            return
        import obstore

        obstore.put(self._bucket, name, source)

    def save(self, write: Callable[[Path], list[tuple[str, str]]]) -> list[tuple[str, str]]:
        """`write(folder)` writes PNGs into `folder` and answers their (name, kind) rows, as the task's
        `process_output` does; on object storage they are then uploaded. All or nothing: if any upload
        fails, those already uploaded are removed and the error is raised."""
        if self.folder is not None:
            return write(self.folder)
        import obstore

        with tempfile.TemporaryDirectory(prefix="t2i-images-") as folder:
            rows = write(Path(folder))
            uploaded: list[str] = []
            try:
                for name, _ in rows:
                    obstore.put(self._bucket, name, (Path(folder) / name).read_bytes())
                    uploaded.append(name)
            except BaseException:
                self.delete(uploaded)
                raise
        return rows

    def path(self, name: str) -> Path | None:
        """A local image's file (None on object storage); `name` is a bare file name."""
        return self.folder / Path(name).name if self.folder is not None else None

    def read(self, name: str) -> bytes:
        """An image's bytes; FileNotFoundError if there is none by that name."""
        name = Path(name).name
        if self.folder is not None:
            return (self.folder / name).read_bytes()
        import obstore

        return bytes(obstore.get(self._bucket, name).bytes())

    def signed_url(self, name: str, expires_s: float) -> str:
        """A pre-signed GET link to an image on object storage, valid `expires_s` seconds."""
        import obstore

        return obstore.sign(self._bucket, "GET", Path(name).name, datetime.timedelta(seconds=expires_s))

    def delete(self, names: Iterable[str]) -> None:
        """Remove images by bare name (never anything outside this folder or prefix); missing ones are fine."""
        names = [Path(name).name for name in names]
        if self.folder is not None:
            for name in names:
                try:
                    (self.folder / name).unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("could not remove image %s: %s", name, exc)
            return
        import obstore

        for name in names:
            try:
                obstore.delete(self._bucket, name)
            except FileNotFoundError:
                pass
            except Exception as exc:  # the bucket away: a later orphan sweep removes it
                log.warning("could not remove image %s: %s", name, exc)

    def older_than(self, seconds: float) -> list[str]:
        """Names of the PNGs (and unfinished `.part` files) older than `seconds`."""
        cutoff = time.time() - seconds
        if self.folder is not None:
            if not self.folder.is_dir():
                return []
            return [path.name for path in self.folder.iterdir()
                    if path.is_file() and (path.suffix == ".png" or path.name.endswith(".part"))
                    and path.stat().st_mtime < cutoff]
        import obstore

        return [Path(meta["path"]).name for batch in obstore.list(self._bucket) for meta in batch
                if meta["path"].endswith(".png") and meta["last_modified"].timestamp() < cutoff]

    def free_bytes(self) -> int | None:
        """Free space on the local disk that holds the images (None on object storage)."""
        return shutil.disk_usage(existing(self.folder)).free if self.folder is not None else None


def existing(path: Path) -> Path:
    """`path`, or its nearest folder that exists (where a file written there would go)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
