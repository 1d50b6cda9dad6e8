"""The store: sessions, processes and their ProcessData rows in SQL.

Every method is one unit of work in its own transaction, so a failure leaves
nothing half-written. Objects returned are detached snapshots (loaded with
their rows) that stay readable after the transaction closes. Sessions are
here; processes are `ProcessRows` (process_rows.py).

Any SQLAlchemy URL works (t2i_task/storage/database.py connects; t2i_task/storage/schema.py
keeps the schema current).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from t2i_task.storage import schema
from t2i_task.storage.database import connect
from t2i_task.storage.errors import (DuplicateSessionName, InvalidTransition, LeaseLost, NotFoundError,
                                     ProcessNotFound, SessionNotFound, StoreError)
from t2i_task.storage.batch_rows import BatchRows
from t2i_task.storage.files import ImageFiles, existing
from t2i_task.storage.process_rows import ERROR_PREFIX, IMAGE_TYPE, RETENTION_LOCK, ProcessRows
from t2i_task.storage.scope import Scope, in_scope, scope_filter
from t2i_task.storage.tables import (
    GenerativeProcess,
    GenerativeSession,
    GenerativeSessionParameterHistory,
    ServerSecret,
    utcnow,
)

log = logging.getLogger(__name__)
BATCH_FILES = "batch-files"  # the folder (or prefix) of OpenAI's files inside the images'

# What callers import from here.
__all__ = ["ERROR_PREFIX", "IMAGE_TYPE", "RETENTION_LOCK", "DuplicateSessionName", "InvalidTransition",
           "LeaseLost", "NotFoundError", "ProcessNotFound", "SessionNotFound", "Store", "StoreError"]


class Store(ProcessRows, BatchRows):
    """Sessions, processes and ProcessData rows; their image files are `images` (a local folder or a
    bucket, t2i_task/storage/files.py), removed with the rows that name them. Bulk jobs' files and
    batches are BatchRows (batch_rows.py), their files' bytes `files`, inside `images`."""

    def __init__(self, database_url: str, images: ImageFiles | str | Path) -> None:
        self.engine = connect(database_url)
        self.images = images if isinstance(images, ImageFiles) else ImageFiles(images)
        self.files = self.images.within(BATCH_FILES)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        schema.upgrade(self.engine)  # Alembic migrations: t2i_task/storage/migrations/

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessionmaker() as session, session.begin():
            yield session

    # Sessions

    def create_session(
        self,
        *,
        task_name: str,
        name: str,
        parameters: dict[str, Any],
        model_name: str | None = None,
        description: str | None = None,
        account: str = "",
    ) -> GenerativeSession:
        """A new session of `account` and its first parameter-history row (DuplicateSessionName if that
        account has a session of that name)."""
        try:
            with self._transaction() as db:
                record = GenerativeSession(task_name=task_name, model_name=model_name, parameters=parameters, name=name,
                                           description=description, account=account)
                db.add(record)
                db.flush()
                db.add(GenerativeSessionParameterHistory(session_id=record.id, parameters=parameters))
        except IntegrityError as exc:
            if self._session_name_taken(name, account):
                raise DuplicateSessionName(name) from exc
            raise
        return record

    def get_or_create_session(
        self, *, task_name: str, name: str, parameters: dict[str, Any], model_name: str | None = None, account: str = ""
    ) -> GenerativeSession:
        """`account`'s session called `name`, created if missing (safe when replicas race to create it)."""
        for _ in range(2):
            found = self._find_session(name, account)
            if found is not None:
                return found
            try:
                return self.create_session(task_name=task_name, name=name, parameters=parameters, model_name=model_name,
                                           account=account)
            except DuplicateSessionName:
                continue  # another writer won the race: read theirs
        raise DuplicateSessionName(name)

    def _find_session(self, name: str, account: str) -> GenerativeSession | None:
        with self._sessionmaker() as db:
            return db.scalar(select(GenerativeSession).where(GenerativeSession.name == name,
                                                             GenerativeSession.account == account))

    def _session_name_taken(self, name: str, account: str) -> bool:
        return self._find_session(name, account) is not None

    def get_session(self, session_id: int, scope: Scope = None) -> GenerativeSession:
        with self._sessionmaker() as db:
            return self._load_session(db, session_id, scope=scope)

    def list_sessions(self, limit: int | None = None, offset: int = 0, scope: Scope = None) -> list[GenerativeSession]:
        """The scope's sessions, oldest first: `limit` of them from the `offset`-th (all by default)."""
        with self._sessionmaker() as db:
            query = select(GenerativeSession).where(scope_filter(GenerativeSession.account, scope))
            return list(db.scalars(query.order_by(GenerativeSession.id).offset(offset).limit(limit)))

    def update_session_parameters(self, session_id: int, parameters: dict[str, Any],
                                  scope: Scope = None) -> GenerativeSession:
        """Replace the session's parameters and record them in its history."""
        with self._transaction() as db:
            record = self._load_session(db, session_id, scope=scope)
            record.parameters = parameters
            record.last_modified = utcnow()
            db.add(GenerativeSessionParameterHistory(session_id=session_id, parameters=parameters))
        return record

    def update_session(self, session_id: int, *, name: str | None = None, description: str | None = None,
                       model_name: str | None = None, parameters: dict[str, Any] | None = None,
                       scope: Scope = None) -> GenerativeSession:
        """Rename a session, describe it or switch its model (with the parameters for it, recorded in its
        history when they change); None leaves a field as it is. All in one transaction."""
        try:
            with self._transaction() as db:
                record = self._load_session(db, session_id, scope=scope)
                for field, value in (("name", name), ("description", description), ("model_name", model_name)):
                    if value is not None:
                        setattr(record, field, value)
                if parameters is not None and parameters != record.parameters:
                    record.parameters = parameters
                    db.add(GenerativeSessionParameterHistory(session_id=session_id, parameters=parameters))
                record.last_modified = utcnow()
        except IntegrityError as exc:
            if name is not None and self._session_name_taken(name, self.get_session(session_id).account):
                raise DuplicateSessionName(name) from exc
            raise
        return record

    def delete_sessions(self, session_ids: Iterable[int], scope: Scope = None) -> None:
        """Delete sessions with their processes, rows and image files; all of them or, if one is missing
        (or outside the scope), none."""
        with self._transaction() as db:
            images = []
            for session_id in session_ids:
                record = self._load_session(db, session_id, scope=scope)
                processes = db.scalars(select(GenerativeProcess).where(GenerativeProcess.session_id == session_id))
                images += [row.data for process in processes for row in process.output if row.data_type == IMAGE_TYPE]
                db.delete(record)
        self.remove_images(images)

    def get_parameter_history(self, session_id: int, scope: Scope = None) -> list[GenerativeSessionParameterHistory]:
        with self._sessionmaker() as db:
            return list(self._load_session(db, session_id, with_history=True, scope=scope).parameter_history)

    @staticmethod
    def _load_session(db: Session, session_id: int, with_history: bool = False,
                      scope: Scope = None) -> GenerativeSession:
        options = [selectinload(GenerativeSession.parameter_history)] if with_history else []
        record = db.get(GenerativeSession, session_id, options=options)
        if record is None or not in_scope(record.account, scope):
            raise SessionNotFound(session_id)
        return record

    def shared_secret(self, name: str) -> str:
        """The secret called `name` that every replica shares: made at random by whichever replica asks
        first, and kept."""
        with self._sessionmaker() as db:
            found = db.get(ServerSecret, name)
        if found is not None:
            return found.value
        try:
            with self._transaction() as db:
                db.add(ServerSecret(name=name, value=secrets.token_hex(32)))
        except IntegrityError:
            pass  # another replica made it first: theirs it is
        with self._sessionmaker() as db:
            return db.get(ServerSecret, name).value

    def low_disks(self, min_free_bytes: float) -> list[str]:
        """The local disks this store writes to (its SQLite file's, its images', temporary files') with less
        free space than `min_free_bytes`, as "<path> (<MB> MB free)"."""
        folders = {Path(tempfile.gettempdir())}
        if self.engine.url.get_backend_name() == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            folders.add(Path(self.engine.url.database).parent)
        if self.images.folder is not None:
            folders.add(self.images.folder)
        low = []
        for folder in sorted(existing(folder) for folder in folders):
            free = shutil.disk_usage(folder).free
            if free < min_free_bytes:
                low.append(f"{folder} ({free / 2**20:.0f} MB free)")
        return low
