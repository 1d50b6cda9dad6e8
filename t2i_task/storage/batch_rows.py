"""Bulk jobs' rows: OpenAI's files and batches, and the batch lines (processes) in them.

`BatchRows` is the part of the store (store.py) that knows them. A batch's lines are
processes (`GenerativeProcess.batch_id`, `custom_id`): stored in one transaction with the
batch, queued at bulk priority with nobody holding them, so that whichever replica has room
claims them (process_rows.py, `claim`) and each line has one result. A line that was invalid
is stored ended (ERROR, with the reason). A batch's files' bytes are kept with the images
(`files`, t2i_task/storage/files.py), their rows here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, insert, or_, select, update

from t2i_task.storage.errors import BatchNotFound, FileNotFound
from t2i_task.storage.process_rows import ERROR_PREFIX, IMAGE_TYPE
from t2i_task.storage.scope import Scope, in_scope, scope_filter
from t2i_task.storage.tables import (Batch, GenerativeProcess, Priority, ProcessData, RunStatus, StoredFile,
                                     utcnow)

# A batch's states (OpenAI's): ended ones have their output and error files.
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, CANCELLING, CANCELLED, EXPIRED = "completed", "failed", "cancelling", "cancelled", "expired"
BATCH_ENDED = (COMPLETED, FAILED, CANCELLED, EXPIRED)
_UNENDED_LINE = GenerativeProcess.status.in_((RunStatus.NOT_STARTED, RunStatus.DELIVERED, RunStatus.STARTED))


@dataclass
class BatchLine:
    """One line of a batch file, as stored: a process to run, or one ended at once with `error`."""

    custom_id: str
    session_id: int
    inputs: list[tuple[str, str]] = field(default_factory=list)
    parameters: dict[str, Any] | None = None  # what it runs with, and how its answer is written
    error: str | None = None  # why it cannot run: it goes to the error file as it is


@dataclass
class BatchCounts:
    total: int
    completed: int
    failed: int


def _ready_to_finalize(now: datetime):
    """A batch whose lines have all ended and that no live replica is writing the results of."""
    lines_left = exists().where(GenerativeProcess.batch_id == Batch.id, _UNENDED_LINE)
    unheld = or_(Batch.owner.is_(None), Batch.lease_expires < now)
    return and_(~lines_left, Batch.status.in_((IN_PROGRESS, CANCELLING, FINALIZING)),
                or_(Batch.status == IN_PROGRESS, unheld))


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class BatchRows:
    """The store's methods for files and batches (it provides `engine`, `_transaction`,
    `_sessionmaker`, `files` and `images`)."""

    # Files

    def create_file(self, purpose: str, filename: str, source: bytes | Path, size: int,
                    account: str = "") -> StoredFile:
        """Keep a file's bytes, then its row: a row always names bytes that exist."""
        stored = StoredFile(id=new_id("file-"), purpose=purpose, filename=filename, bytes=size, created=utcnow(),
                            account=account)
        self.files.put(stored.id, source)
        try:
            with self._transaction() as db:
                db.add(stored)
        except BaseException:
            self.files.delete([stored.id])
            raise
        return stored

    def get_file(self, file_id: str, scope: Scope = None) -> StoredFile:
        with self._sessionmaker() as db:
            stored = db.get(StoredFile, file_id)
        if stored is None or not in_scope(stored.account, scope):
            raise FileNotFound(file_id)
        return stored

    def read_file(self, file_id: str) -> bytes:
        """The bytes of a file its caller has looked up (get_file); FileNotFound if they are gone."""
        try:
            return self.files.read(file_id)
        except FileNotFoundError:
            raise FileNotFound(file_id) from None

    def list_files(self, purpose: str | None, limit: int, after: str | None, newest_first: bool,
                   scope: Scope = None) -> list[StoredFile]:
        query = select(StoredFile).where(scope_filter(StoredFile.account, scope))
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        order = (StoredFile.created.desc(), StoredFile.id.desc()) if newest_first else (StoredFile.created,
                                                                                         StoredFile.id)
        with self._sessionmaker() as db:
            if after:
                cursor = db.get(StoredFile, after)
                if cursor is None or not in_scope(cursor.account, scope):
                    raise FileNotFound(after)
                newer = or_(StoredFile.created > cursor.created,
                            and_(StoredFile.created == cursor.created, StoredFile.id > cursor.id))
                older = or_(StoredFile.created < cursor.created,
                            and_(StoredFile.created == cursor.created, StoredFile.id < cursor.id))
                query = query.where(older if newest_first else newer)
            return list(db.scalars(query.order_by(*order).limit(limit)))

    def delete_file(self, file_id: str, scope: Scope = None) -> None:
        with self._transaction() as db:
            stored = db.get(StoredFile, file_id)
            if stored is None or not in_scope(stored.account, scope):
                raise FileNotFound(file_id)
            db.delete(stored)
        self.files.delete([file_id])  # once the row is gone: no row names missing bytes

    # Batches

    def create_batch(self, batch: Batch, lines: Sequence[BatchLine]) -> Batch:
        """The batch and every line's process (and input rows), in one transaction: all or nothing. The lines
        are the batch's account's (their sessions are that account's too)."""
        now = utcnow()
        batch.created, batch.in_progress_at, batch.status, batch.total = now, now, IN_PROGRESS, len(lines)
        processes = [{
            "session_id": line.session_id, "batch_id": batch.id, "custom_id": line.custom_id,
            "status": RunStatus.ERROR if line.error else RunStatus.DELIVERED, "created": now, "last_modified": now,
            "delivery_time": now, "end_time": now if line.error else None, "owner": None, "attempts": 0,
            "progress_step": None if line.error else 0,
            "progress_total": None if line.error else (line.parameters or {}).get("num_inference_steps"),
            "parameters": line.parameters, "priority": int(Priority.BULK), "lease_expires": None,
            "account": batch.account or "",
        } for line in lines]
        with self._transaction() as db:
            db.add(batch)
            db.flush()
            ids = db.execute(insert(GenerativeProcess.__table__).returning(
                GenerativeProcess.__table__.c.id, sort_by_parameter_order=True), processes).scalars().all()
            rows = [{"process_id": process_id, "data": data, "data_type": data_type, "is_input": True}
                    for process_id, line in zip(ids, lines) for data, data_type in line.inputs]
            rows += [{"process_id": process_id, "data": ERROR_PREFIX + line.error, "data_type": "str",
                      "is_input": False} for process_id, line in zip(ids, lines) if line.error]
            if rows:
                db.execute(insert(ProcessData.__table__), rows)
        return batch

    def get_batch(self, batch_id: str, scope: Scope = None) -> Batch:
        with self._sessionmaker() as db:
            batch = db.get(Batch, batch_id)
        if batch is None or not in_scope(batch.account, scope):
            raise BatchNotFound(batch_id)
        return batch

    def list_batches(self, limit: int, after: str | None, scope: Scope = None) -> list[Batch]:
        """The scope's batches, newest first; `after` a batch id: those created before it."""
        query = (select(Batch).where(scope_filter(Batch.account, scope))
                 .order_by(Batch.created.desc(), Batch.id.desc()))
        with self._sessionmaker() as db:
            if after:
                cursor = db.get(Batch, after)
                if cursor is None or not in_scope(cursor.account, scope):
                    raise BatchNotFound(after)
                query = query.where(or_(Batch.created < cursor.created,
                                        and_(Batch.created == cursor.created, Batch.id < cursor.id)))
            return list(db.scalars(query.limit(limit)))

    def batch_counts(self, batches: Iterable[Batch]) -> dict[str, BatchCounts]:
        """Each batch's request counts: lines in all, FINISHED, ended otherwise."""
        batches = list(batches)
        with self._sessionmaker() as db:
            rows = db.execute(select(GenerativeProcess.batch_id, GenerativeProcess.status, func.count())
                              .where(GenerativeProcess.batch_id.in_([b.id for b in batches]))
                              .group_by(GenerativeProcess.batch_id, GenerativeProcess.status)).all()
        counts = {b.id: BatchCounts(b.total, 0, 0) for b in batches}
        for batch_id, status, count in rows:
            if status is RunStatus.FINISHED:
                counts[batch_id].completed += count
            elif status is RunStatus.ERROR:
                counts[batch_id].failed += count
        return counts

    def end_batch_lines(self, batch_id: str, reason: str, *, expired: bool = False) -> Batch:
        """Cancel a batch (or expire it): it becomes `cancelling`, and every line not yet ended ends
        ERROR with `reason` (a replica running one stops it when it next renews its lease). A batch
        that has ended, or is being finalized, is returned as it is."""
        now = utcnow()
        with self._transaction() as db:
            batch = db.get(Batch, batch_id, with_for_update=True)
            if batch is None:
                raise BatchNotFound(batch_id)
            if batch.status not in (VALIDATING, IN_PROGRESS, CANCELLING):
                return batch
            if batch.status != CANCELLING:
                batch.status, batch.cancelling_at = CANCELLING, now
                if expired:
                    batch.expired_at = now
            unended = list(db.scalars(select(GenerativeProcess.id).where(
                GenerativeProcess.batch_id == batch_id, _UNENDED_LINE).with_for_update()))
            if unended:
                db.execute(update(GenerativeProcess).where(GenerativeProcess.id.in_(unended), _UNENDED_LINE)
                           .values(status=RunStatus.ERROR, end_time=now, last_modified=now, owner=None,
                                   lease_expires=None).execution_options(synchronize_session=False))
                db.execute(insert(ProcessData.__table__), [
                    {"process_id": process_id, "data": ERROR_PREFIX + reason, "data_type": "str", "is_input": False}
                    for process_id in unended])
            return batch

    def batches_to_end(self) -> tuple[list[str], list[str]]:
        """(batches past their completion window and not ending yet; batches ready for their results to
        be written: all their lines ended, and no live replica writing them)."""
        now = utcnow()
        with self._sessionmaker() as db:
            expired = list(db.scalars(select(Batch.id).where(Batch.status == IN_PROGRESS, Batch.expires_at < now)))
            ready = list(db.scalars(select(Batch.id).where(_ready_to_finalize(now)).order_by(Batch.created)))
        return expired, ready

    def take_batch_to_finalize(self, batch_id: str, owner: str, lease_s: float) -> Batch | None:
        """Hold the batch for writing its results, if its lines have all ended and no other replica
        holds it; None otherwise. Of two replicas, one gets it. A running batch becomes `finalizing`;
        a cancelled one stays `cancelling` until its results are written (as OpenAI's do)."""
        now = utcnow()
        with self._transaction() as db:
            taken = db.execute(update(Batch).where(Batch.id == batch_id, _ready_to_finalize(now)).values(
                status=case((Batch.status == IN_PROGRESS, FINALIZING), else_=Batch.status),
                finalizing_at=case((Batch.status == IN_PROGRESS, now), else_=Batch.finalizing_at),
                owner=owner, lease_expires=now + timedelta(seconds=lease_s),
            ).execution_options(synchronize_session=False))
            if taken.rowcount != 1:
                return None
            return db.get(Batch, batch_id)

    def batch_lines(self, batch_id: str, chunk: int = 500) -> Iterator[list[GenerativeProcess]]:
        """A batch's lines in file order (with their rows), `chunk` at a time."""
        last = 0
        while True:
            with self._sessionmaker() as db:
                lines = list(db.scalars(select(GenerativeProcess).where(
                    GenerativeProcess.batch_id == batch_id, GenerativeProcess.id > last)
                    .order_by(GenerativeProcess.id).limit(chunk)))
            if not lines:
                return
            yield lines
            last = lines[-1].id

    def end_batch(self, batch_id: str, owner: str, output_file_id: str | None,
                  error_file_id: str | None) -> Batch | None:
        """Record a finalized batch's files and final state (cancelled, expired or completed); only
        by the replica holding it (else None)."""
        now = utcnow()
        with self._transaction() as db:
            batch = db.get(Batch, batch_id, with_for_update=True)
            if batch is None or batch.status not in (FINALIZING, CANCELLING) or batch.owner != owner:
                return None
            ended = EXPIRED if batch.expired_at else CANCELLED if batch.cancelling_at else COMPLETED
            batch.status, batch.output_file_id, batch.error_file_id = ended, output_file_id, error_file_id
            batch.owner, batch.lease_expires = None, None
            if ended == CANCELLED:
                batch.cancelled_at = now
            elif ended == COMPLETED:
                batch.completed_at = now  # (an expired batch's expired_at is when it expired)
            return batch

    def remove_batches_ended_before(self, cutoff: datetime) -> int:
        """Delete batches that ended before `cutoff`, with their lines, images and files, and batch
        input files uploaded before it that no unended batch reads; how many batches."""
        ended_at = func.coalesce(Batch.completed_at, Batch.cancelled_at, Batch.expired_at, Batch.failed_at)
        with self._transaction() as db:
            old = list(db.scalars(select(Batch).where(Batch.status.in_(BATCH_ENDED), ended_at < cutoff)))
            ids = [batch.id for batch in old]
            images = list(db.scalars(select(ProcessData.data).join(GenerativeProcess).where(
                GenerativeProcess.batch_id.in_(ids), ProcessData.data_type == IMAGE_TYPE, ~ProcessData.is_input)))
            files = [file_id for batch in old for file_id in (batch.output_file_id, batch.error_file_id) if file_id]
            read = select(Batch.input_file_id).where(Batch.status.not_in(BATCH_ENDED))
            files += db.scalars(select(StoredFile.id).where(StoredFile.created < cutoff,
                                                            StoredFile.id.not_in(read)))
            db.execute(delete(GenerativeProcess).where(GenerativeProcess.batch_id.in_(ids)))
            db.execute(delete(Batch).where(Batch.id.in_(ids)))
            db.execute(delete(StoredFile).where(StoredFile.id.in_(files)))
        self.images.delete(images)
        self.files.delete(files)
        return len(ids)
