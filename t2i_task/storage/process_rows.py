"""A process's rows: created, moved from state to state, leased, taken over, forgotten.

`ProcessRows` is the part of the store (store.py) that knows processes; the statements on
every generation's path are built once here.

Leases: the replica that stores a process owns it (`owner`) until `lease_expires`, and renews
the lease while the process is in its hands (`renew_leases`). Its writes to a process name it
(`holder`) and are made only while it still owns the process (else LeaseLost): a replica that
lost a process to another stores nothing for it. `claim` takes a replica's own work back after
a restart, work released by a stopping replica (`release`), and work whose lease expired
(its owner died or hangs), with FOR UPDATE SKIP LOCKED on PostgreSQL so two replicas never
take the same row.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Update, and_, bindparam, case, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from t2i_task.storage.errors import InvalidTransition, LeaseLost, ProcessNotFound, SessionNotFound
from t2i_task.storage.scope import Scope, in_scope, scope_filter
from t2i_task.storage.tables import (GenerativeProcess, GenerativeSession, KeyUsage, Priority, ProcessData, RunStatus,
                                    utcnow)

ERROR_PREFIX = "Error details: "
IMAGE_TYPE = "Image"

# The states a process may move to from each state.
_TRANSITIONS: dict[RunStatus, set[RunStatus]] = {
    RunStatus.NOT_STARTED: {RunStatus.DELIVERED, RunStatus.ERROR},
    RunStatus.DELIVERED: {RunStatus.STARTED, RunStatus.ERROR},
    RunStatus.STARTED: {RunStatus.FINISHED, RunStatus.ERROR, RunStatus.DELIVERED},  # back to the queue
    RunStatus.FINISHED: set(),
    RunStatus.ERROR: set(),
}


# The statements on every generation's path, built once, so that a call only binds their values:
# built at each call with its values in them, creating a process spent 1.1-1.5 ms building the
# statements and their cache keys, against 0.3 ms with them built once (2-core VM, 2026-12-03).
_PROCESSES, _DATA, _SESSIONS = GenerativeProcess.__table__, ProcessData.__table__, GenerativeSession.__table__
_SESSION_ACCOUNT = select(_SESSIONS.c.account).where(_SESSIONS.c.id == bindparam("session_id"))
_INSERT_PROCESS = insert(_PROCESSES).returning(_PROCESSES.c.id)
_INSERT_ROWS = insert(_DATA).returning(_DATA.c.id, sort_by_parameter_order=True)
_INSERT_OUTPUTS = insert(_DATA)
_USAGE = KeyUsage.__table__
_ACCOUNT_OF = select(_PROCESSES.c.account).where(_PROCESSES.c.id == bindparam("process_id"))
_STATE_OF = select(_PROCESSES.c.status, _PROCESSES.c.owner).where(_PROCESSES.c.id == bindparam("process_id"))
_UNENDED = (RunStatus.DELIVERED, RunStatus.STARTED)  # queued or running: held under a lease
_HOLDER = bindparam("holder")  # the replica writing ("owner" is the column's own name in SET clauses)


@functools.cache
def _move_to(status: RunStatus, held: bool = False) -> Update:
    """The UPDATE that moves process `process_id` to `status` at `now`, from the statuses it may
    come from only (and, `held`, only while replica `holder` owns it): on PostgreSQL it takes the
    row's lock, so of two replicas moving one process at once, the second finds it already moved."""
    now = bindparam("now", type_=_PROCESSES.c.last_modified.type)
    changes: dict[str, Any] = {"status": status, "last_modified": now}
    if status is RunStatus.DELIVERED:
        changes["delivery_time"] = now
    elif status is RunStatus.STARTED:
        changes.update(start_time=now, attempts=_PROCESSES.c.attempts + 1)
    else:
        changes["end_time"] = now
        if status is RunStatus.FINISHED:  # all its steps done
            total = _PROCESSES.c.progress_total
            changes["progress_step"] = case((total > 0, total), else_=_PROCESSES.c.progress_step)
    sources = [source for source, targets in _TRANSITIONS.items() if status in targets]
    statement = update(_PROCESSES).where(_PROCESSES.c.id == bindparam("process_id"), _PROCESSES.c.status.in_(sources))
    if held:
        statement = statement.where(_PROCESSES.c.owner == _HOLDER)
    return statement.values(changes)


_NOW = bindparam("now", type_=_PROCESSES.c.last_modified.type)
_IDS = bindparam("ids", expanding=True)
_START_SENT = (update(_PROCESSES)
               .where(_PROCESSES.c.id.in_(_IDS), _PROCESSES.c.status == RunStatus.DELIVERED)
               .values(status=RunStatus.STARTED, last_modified=_NOW, start_time=_NOW,
                       attempts=_PROCESSES.c.attempts + 1))
_RENEW = (update(_PROCESSES)
          .where(_PROCESSES.c.id.in_(_IDS), _PROCESSES.c.owner == _HOLDER, _PROCESSES.c.status.in_(_UNENDED))
          .values(lease_expires=bindparam("until", type_=_PROCESSES.c.lease_expires.type))
          .returning(_PROCESSES.c.id))
_RELEASE = (update(_PROCESSES)
            .where(_PROCESSES.c.id.in_(_IDS), _PROCESSES.c.owner == _HOLDER, _PROCESSES.c.status.in_(_UNENDED))
            .values(status=RunStatus.DELIVERED, owner=None, lease_expires=None, last_modified=_NOW,
                    delivery_time=case((_PROCESSES.c.status == RunStatus.STARTED, _NOW),
                                       else_=_PROCESSES.c.delivery_time)))


def _upsert(dialect: str):
    """INSERT ... ON CONFLICT DO UPDATE, as the dialect spells it (both have it, in their own module)."""
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# Any fixed 64-bit number: the advisory lock of the replica that runs the retention sweep.
RETENTION_LOCK = 0x7432_6952_6574_6E74


class ProcessRows:
    """The store's process methods (it provides `engine`, `_sessionmaker`, `_transaction`, `images`)."""

    def list_recent_processes(self, limit: int, changed_since: datetime | None = None,
                              offset: int = 0, scope: Scope = None) -> list[GenerativeProcess]:
        """The scope's newest processes of every session (changed after `changed_since`, when given), newest
        first: `limit` of them from the `offset`-th."""
        with self._sessionmaker() as db:
            query = (select(GenerativeProcess).where(scope_filter(GenerativeProcess.account, scope))
                     .order_by(GenerativeProcess.id.desc()).offset(offset).limit(limit))
            if changed_since is not None:
                query = query.where(GenerativeProcess.last_modified > changed_since)
            return list(db.scalars(query))

    def list_unended_processes(self) -> list[GenerativeProcess]:
        """Every process not yet FINISHED or ERROR, oldest first."""
        with self._sessionmaker() as db:
            query = select(GenerativeProcess).where(GenerativeProcess.status.not_in(
                (RunStatus.FINISHED, RunStatus.ERROR)))
            return list(db.scalars(query.order_by(GenerativeProcess.id)))

    def create_process(
        self,
        session_id: int,
        inputs: Sequence[tuple[str, str]],
        status: RunStatus = RunStatus.DELIVERED,
        owner: str | None = None,
        parameters: dict[str, Any] | None = None,
        lease_s: float | None = None,
        priority: Priority = Priority.QUEUED,
    ) -> GenerativeProcess:
        """A process and its input rows, in one transaction.

        By default the process is DELIVERED at once: this server queues every
        process as soon as it is stored; one that goes to the model at once may
        be stored STARTED (its first attempt). `owner` names the server instance
        whose queue holds it, for `lease_s` from now (renewed by `renew_leases`);
        `parameters`, what it runs with (its model and generation parameters;
        their denoising steps are its progress: 0 of them).
        """
        steps = (parameters or {}).get("num_inference_steps")
        if status not in (RunStatus.NOT_STARTED, RunStatus.DELIVERED, RunStatus.STARTED):
            raise ValueError(f"a new process is NOT_STARTED, DELIVERED or STARTED, not {status.name}")
        now = utcnow()
        started = status is RunStatus.STARTED
        # Its account is its session's, read below in the same transaction.
        values = {"session_id": session_id, "status": status, "created": now, "last_modified": now,
                  "delivery_time": now if status is not RunStatus.NOT_STARTED else None,
                  "start_time": now if started else None, "end_time": None, "owner": owner,
                  "attempts": 1 if started else 0, "progress_step": 0 if steps else None, "progress_total": steps,
                  "parameters": parameters, "priority": int(priority),
                  "lease_expires": now + timedelta(seconds=lease_s) if owner and lease_s else None}
        # Core statements, not the ORM's unit of work: every generation is stored on its request's path.
        with self.engine.begin() as db:
            values["account"] = db.scalar(_SESSION_ACCOUNT, {"session_id": session_id})
            if values["account"] is None:
                raise SessionNotFound(session_id)
            process_id = db.execute(_INSERT_PROCESS, values).scalar_one()
            rows = [{"process_id": process_id, "data": data, "data_type": data_type, "is_input": True}
                    for data, data_type in inputs]
            row_ids = db.execute(_INSERT_ROWS, rows).scalars().all() if rows else []
        return GenerativeProcess(id=process_id, **values,
                                 data=[ProcessData(id=row_id, **row) for row_id, row in zip(row_ids, rows)])

    def get_process(self, process_id: int, scope: Scope = None) -> GenerativeProcess:
        with self._sessionmaker() as db:
            return self._load_process(db, process_id, scope)

    def list_processes(self, session_id: int, limit: int | None = None, offset: int = 0,
                       scope: Scope = None) -> list[GenerativeProcess]:
        """A session's processes, oldest first: `limit` of them from the `offset`-th (all by default)."""
        with self._sessionmaker() as db:
            self._load_session(db, session_id, scope=scope)
            query = select(GenerativeProcess).where(GenerativeProcess.session_id == session_id)
            return list(db.scalars(query.order_by(GenerativeProcess.id).offset(offset).limit(limit)))

    def deliver_process(self, process_id: int) -> None:
        """Queue a NOT_STARTED process, or put a STARTED one back in the queue."""
        self._move(process_id, RunStatus.DELIVERED)

    def start_process(self, process_id: int) -> None:
        self._move(process_id, RunStatus.STARTED)

    def start_processes(self, process_ids: Sequence[int], holder: str | None = None) -> None:
        """Mark queued processes STARTED (their start time, one attempt more) in one transaction:
        those whose model call has just been sent. One that has ended meanwhile (cancelled),
        that was stored started, or (given `holder`) that another replica holds now is left as it is."""
        statement = _START_SENT if holder is None else _START_SENT.where(_PROCESSES.c.owner == _HOLDER)
        with self.engine.begin() as db:
            db.execute(statement, {"ids": list(process_ids), "now": utcnow(), "holder": holder})

    def finish_process(self, process_id: int, outputs: Iterable[tuple[str, str]], holder: str | None = None,
                       model_seconds: float = 0.0) -> None:
        """Attach the output rows and mark the process FINISHED, together, and add its images and
        `model_seconds` to its owner's usage; given `holder`, only while that replica owns the process
        (else LeaseLost, and nothing is written)."""
        self._move(process_id, RunStatus.FINISHED, outputs, holder, model_seconds)

    def usage(self, scope: Scope = None) -> list[KeyUsage]:
        """What each owner of the scope has used, by name."""
        with self._sessionmaker() as db:
            return list(db.scalars(select(KeyUsage).where(scope_filter(KeyUsage.account, scope))
                                   .order_by(KeyUsage.account)))

    def record_progress(self, progress: dict[int, tuple[int, int]]) -> None:
        """Steps done and in all of running processes, in one transaction; ended ones keep theirs."""
        with self._transaction() as db:
            for process in db.scalars(select(GenerativeProcess).where(
                    GenerativeProcess.id.in_(progress), GenerativeProcess.status == RunStatus.STARTED)):
                process.progress_step, process.progress_total = progress[process.id]

    def fail_process(self, process_id: int, message: str, holder: str | None = None) -> None:
        """Mark the process ERROR with one `("Error details: ...", "str")` output row; given
        `holder`, only while that replica owns the process (a cancel comes from any replica)."""
        self._move(process_id, RunStatus.ERROR, [(ERROR_PREFIX + message, "str")], holder)

    def _move(self, process_id: int, status: RunStatus, outputs: Iterable[tuple[str, str]] = (),
              holder: str | None = None, model_seconds: float = 0.0) -> None:
        # One guarded UPDATE (`_move_to`) rather than loading the process and its rows: the
        # transitions are on every generation's path.
        with self.engine.begin() as db:  # Core, no ORM session: nothing is loaded
            moved = db.execute(_move_to(status, holder is not None),
                               {"process_id": process_id, "now": utcnow(), "holder": holder})
            if moved.rowcount != 1:
                state = db.execute(_STATE_OF, {"process_id": process_id}).one_or_none()
                if state is None:
                    raise ProcessNotFound(process_id)
                current, owner = state
                if holder is not None and current in _UNENDED and owner != holder:
                    raise LeaseLost(process_id, owner)
                raise InvalidTransition(process_id, current, status)
            rows = [{"process_id": process_id, "data": data, "data_type": data_type, "is_input": False}
                    for data, data_type in outputs]
            if rows:
                db.execute(_INSERT_OUTPUTS, rows)
            if status is RunStatus.FINISHED:
                account = db.scalar(_ACCOUNT_OF, {"process_id": process_id})
                images = sum(1 for row in rows if row["data_type"] == IMAGE_TYPE)
                add = _upsert(db.dialect.name)(_USAGE).values(account=account, images=images,
                                                               model_seconds=model_seconds)
                db.execute(add.on_conflict_do_update(index_elements=["account"], set_={
                    "images": _USAGE.c.images + images, "model_seconds": _USAGE.c.model_seconds + model_seconds}))

    def renew_leases(self, holder: str, process_ids: Iterable[int], lease_s: float) -> set[int]:
        """Extend `holder`'s leases on these processes to `lease_s` from now, in one statement;
        the ids it still holds. One missing was ended (cancelled or deleted, perhaps by another
        replica) or taken over: its holder stops working on it."""
        ids = list(process_ids)
        if not ids:
            return set()
        with self.engine.begin() as db:
            until = utcnow() + timedelta(seconds=lease_s)
            return set(db.scalars(_RENEW, {"ids": ids, "holder": holder, "until": until}))

    def release(self, holder: str, process_ids: Iterable[int]) -> int:
        """Give back processes `holder` will not finish (it is stopping): queued again, owned by
        nobody, so that any replica takes them at its next sweep. How many were released."""
        ids = list(process_ids)
        if not ids:
            return 0
        with self.engine.begin() as db:
            return db.execute(_RELEASE, {"ids": ids, "holder": holder, "now": utcnow()}).rowcount

    def claim(
        self, owner: str, lease_s: float, max_attempts: int, exclude: Iterable[int] = (), limit: int | None = None,
    ) -> tuple[list[GenerativeProcess], list[GenerativeProcess]]:
        """Take queued or running processes that nobody works on, under a lease of `lease_s`:
        all of `owner`'s own not in its hands (not in `exclude`: after a restart, all of them),
        then, up to `limit` more, those released or whose lease expired (oldest first, live ones
        before queued ones).

        A STARTED process goes back to DELIVERED, or to ERROR once it has been started
        `max_attempts` times (its generation keeps killing the server that takes it, or keeps
        being interrupted). A live process ends ERROR: the client that waited for it was
        connected to the replica that stopped. Returns (processes to queue, processes ended),
        in one transaction.
        """
        now = utcnow()
        with self._transaction() as db:
            unheld = (select(GenerativeProcess)
                      .where(GenerativeProcess.status.in_(_UNENDED), GenerativeProcess.id.not_in(list(exclude)))
                      .order_by(func.coalesce(GenerativeProcess.priority, Priority.QUEUED), GenerativeProcess.id)
                      .with_for_update(skip_locked=True))  # rows another replica is claiming are skipped
            taken = list(db.scalars(unheld.where(GenerativeProcess.owner == owner)))
            if limit is None or limit > 0:
                abandoned = unheld.where(or_(GenerativeProcess.owner.is_(None), and_(
                    GenerativeProcess.owner != owner, GenerativeProcess.lease_expires < now)))
                taken += db.scalars(abandoned.limit(limit))
            queued, ended = [], []
            for process in taken:
                reason = None
                if process.priority == Priority.LIVE:
                    reason = (f"the server answering this request ({process.owner or 'a replica'}) stopped, "
                              "and its client with it; not run again")
                elif process.status is RunStatus.STARTED and process.attempts >= max_attempts:
                    reason = (f"interrupted {process.attempts} times while generating "
                              f"(server stopped or crashed); not retried again")
                if reason:
                    process.status, process.end_time = RunStatus.ERROR, now
                    process.data.append(ProcessData(data=ERROR_PREFIX + reason, data_type="str", is_input=False))
                    ended.append(process)
                else:
                    if process.status is RunStatus.STARTED:
                        process.status, process.delivery_time = RunStatus.DELIVERED, now
                    process.owner, process.lease_expires = owner, now + timedelta(seconds=lease_s)
                    queued.append(process)
                process.last_modified = now
        return queued, ended

    def waiting_by_priority(self) -> dict[Priority, int]:
        """How many stored processes wait for the model (queued, not started), by priority."""
        priority = func.coalesce(GenerativeProcess.priority, Priority.QUEUED)
        with self._sessionmaker() as db:
            counts = dict(db.execute(select(priority, func.count()).where(
                GenerativeProcess.status == RunStatus.DELIVERED).group_by(priority)).all())
        return {level: counts.get(int(level), 0) for level in Priority}

    def unended_of(self, account: str) -> int:
        """How many of an account's generations are queued or running, on every replica (a batch's lines
        aside: they wait in the bulk lane)."""
        with self._sessionmaker() as db:
            return db.scalar(select(func.count()).where(
                GenerativeProcess.account == account, GenerativeProcess.status.in_(_UNENDED),
                GenerativeProcess.batch_id.is_(None)))

    def remove_orphan_images(self, older_than_s: float) -> list[str]:
        """Remove PNGs (and unfinished `.part` files) that no process row names.

        Only files older than `older_than_s`: a file that another server is
        writing right now has no row yet.
        """
        candidates = self.images.older_than(older_than_s)
        if not candidates:
            return []
        with self._sessionmaker() as db:
            named = set(db.scalars(select(ProcessData.data).where(ProcessData.data_type == IMAGE_TYPE)))
        orphans = [name for name in candidates if name not in named]
        self.remove_images(orphans)
        return orphans

    def remove_ended_before(self, cutoff: datetime, batch: int = 500) -> int:
        """Delete processes that ended before `cutoff`, with their rows and image files (sessions
        stay); how many. One replica at a time: on PostgreSQL a replica that finds another one
        sweeping skips (an advisory lock), so two never delete the same rows."""
        removed = 0
        while True:
            with self._transaction() as db:
                if db.bind.dialect.name == "postgresql" and not db.scalar(
                        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RETENTION_LOCK}):
                    return removed
                ended = list(db.scalars(select(GenerativeProcess).where(
                    GenerativeProcess.status.in_((RunStatus.FINISHED, RunStatus.ERROR)),
                    GenerativeProcess.batch_id.is_(None),  # a batch's lines go with their batch (batch_rows.py)
                    GenerativeProcess.end_time < cutoff).order_by(GenerativeProcess.id).limit(batch)))
                images = [row.data for process in ended for row in process.output if row.data_type == IMAGE_TYPE]
                for process in ended:
                    db.delete(process)
            self.remove_images(images)  # once the rows are gone: a failed delete leaves whole processes
            removed += len(ended)
            if len(ended) < batch:
                return removed

    def delete_process(self, process_id: int, scope: Scope = None) -> None:
        """Delete the process, its rows and its image files."""
        with self._transaction() as db:
            process = self._load_process(db, process_id, scope)
            images = [row.data for row in process.output if row.data_type == IMAGE_TYPE]
            db.delete(process)
        # Files go only once the rows are gone: a failed delete leaves a whole process.
        self.remove_images(images)

    def remove_images(self, file_names: Iterable[str]) -> None:
        """Remove image files by bare name; never anything outside the images' folder or prefix."""
        self.images.delete(file_names)

    def image_in_scope(self, file_name: str, scope: Scope) -> bool:
        """Whether an image is one of the scope's processes' outputs."""
        if scope is None:
            return True
        query = (select(GenerativeProcess.account).join(ProcessData, ProcessData.process_id == GenerativeProcess.id)
                 .where(ProcessData.data == file_name, ProcessData.is_input.is_(False)).limit(1))
        with self._sessionmaker() as db:
            account = db.scalar(query)
        return account is not None and in_scope(account, scope)

    @staticmethod
    def _load_process(db: Session, process_id: int, scope: Scope = None) -> GenerativeProcess:
        process = db.get(GenerativeProcess, process_id)
        if process is None or not in_scope(process.account, scope):
            raise ProcessNotFound(process_id)
        return process
