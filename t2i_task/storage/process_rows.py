"""A process's rows: created, moved from state to state, recovered after a restart, forgotten.

`ProcessRows` is the part of the store (store.py) that knows processes; the statements on
every generation's path are built once here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Update, bindparam, case, insert, select, text, update
from sqlalchemy.orm import Session

from t2i_task.storage.errors import InvalidTransition, ProcessNotFound, SessionNotFound
from t2i_task.storage.tables import GenerativeProcess, GenerativeSession, ProcessData, RunStatus, utcnow

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
_SESSION_EXISTS = select(_SESSIONS.c.id).where(_SESSIONS.c.id == bindparam("session_id"))
_INSERT_PROCESS = insert(_PROCESSES).returning(_PROCESSES.c.id)
_INSERT_ROWS = insert(_DATA).returning(_DATA.c.id, sort_by_parameter_order=True)
_INSERT_OUTPUTS = insert(_DATA)
_STATUS_OF = select(_PROCESSES.c.status).where(_PROCESSES.c.id == bindparam("process_id"))


@functools.cache
def _move_to(status: RunStatus) -> Update:
    """The UPDATE that moves process `process_id` to `status` at `now`, from the statuses it may
    come from only: on PostgreSQL it takes the row's lock, so of two replicas moving one process
    at once, the second finds it already moved."""
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
    return (update(_PROCESSES).where(_PROCESSES.c.id == bindparam("process_id"), _PROCESSES.c.status.in_(sources))
            .values(changes))


_NOW = bindparam("now", type_=_PROCESSES.c.last_modified.type)
_START_SENT = (update(_PROCESSES)
               .where(_PROCESSES.c.id.in_(bindparam("ids", expanding=True)),
                      _PROCESSES.c.status == RunStatus.DELIVERED)
               .values(status=RunStatus.STARTED, last_modified=_NOW, start_time=_NOW,
                       attempts=_PROCESSES.c.attempts + 1))


# Any fixed 64-bit number: the advisory lock of the replica that runs the retention sweep.
RETENTION_LOCK = 0x7432_6952_6574_6E74


class ProcessRows:
    """The store's process methods (it provides `engine`, `_sessionmaker`, `_transaction`, `images`)."""

    def list_recent_processes(self, limit: int, changed_since: datetime | None = None,
                              offset: int = 0) -> list[GenerativeProcess]:
        """The newest processes of every session (changed after `changed_since`, when given), newest first:
        `limit` of them from the `offset`-th."""
        with self._sessionmaker() as db:
            query = select(GenerativeProcess).order_by(GenerativeProcess.id.desc()).offset(offset).limit(limit)
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
    ) -> GenerativeProcess:
        """A process and its input rows, in one transaction.

        By default the process is DELIVERED at once: this server queues every
        process as soon as it is stored; one that goes to the model at once may
        be stored STARTED (its first attempt). `owner` names the server instance
        whose queue holds it; `parameters`, what it runs with (its model and
        generation parameters; their denoising steps are its progress: 0 of them).
        """
        steps = (parameters or {}).get("num_inference_steps")
        if status not in (RunStatus.NOT_STARTED, RunStatus.DELIVERED, RunStatus.STARTED):
            raise ValueError(f"a new process is NOT_STARTED, DELIVERED or STARTED, not {status.name}")
        now = utcnow()
        started = status is RunStatus.STARTED
        values = {"session_id": session_id, "status": status, "created": now, "last_modified": now,
                  "delivery_time": now if status is not RunStatus.NOT_STARTED else None,
                  "start_time": now if started else None, "end_time": None, "owner": owner,
                  "attempts": 1 if started else 0, "progress_step": 0 if steps else None, "progress_total": steps,
                  "parameters": parameters}
        # Core statements, not the ORM's unit of work: every generation is stored on its request's path.
        with self.engine.begin() as db:
            if db.scalar(_SESSION_EXISTS, {"session_id": session_id}) is None:
                raise SessionNotFound(session_id)
            process_id = db.execute(_INSERT_PROCESS, values).scalar_one()
            rows = [{"process_id": process_id, "data": data, "data_type": data_type, "is_input": True}
                    for data, data_type in inputs]
            row_ids = db.execute(_INSERT_ROWS, rows).scalars().all() if rows else []
        return GenerativeProcess(id=process_id, **values,
                                 data=[ProcessData(id=row_id, **row) for row_id, row in zip(row_ids, rows)])

    def get_process(self, process_id: int) -> GenerativeProcess:
        with self._sessionmaker() as db:
            return self._load_process(db, process_id)

    def list_processes(self, session_id: int, limit: int | None = None, offset: int = 0) -> list[GenerativeProcess]:
        """A session's processes, oldest first: `limit` of them from the `offset`-th (all by default)."""
        with self._sessionmaker() as db:
            self._load_session(db, session_id)
            query = select(GenerativeProcess).where(GenerativeProcess.session_id == session_id)
            return list(db.scalars(query.order_by(GenerativeProcess.id).offset(offset).limit(limit)))

    def deliver_process(self, process_id: int) -> None:
        """Queue a NOT_STARTED process, or put a STARTED one back in the queue."""
        self._move(process_id, RunStatus.DELIVERED)

    def start_process(self, process_id: int) -> None:
        self._move(process_id, RunStatus.STARTED)

    def start_processes(self, process_ids: Sequence[int]) -> None:
        """Mark queued processes STARTED (their start time, one attempt more) in one transaction:
        those whose model call has just been sent. One that has ended meanwhile (cancelled) or
        that was stored started is left as it is."""
        with self.engine.begin() as db:
            db.execute(_START_SENT, {"ids": list(process_ids), "now": utcnow()})

    def finish_process(self, process_id: int, outputs: Iterable[tuple[str, str]]) -> None:
        """Attach the output rows and mark the process FINISHED, together."""
        self._move(process_id, RunStatus.FINISHED, outputs)

    def record_progress(self, progress: dict[int, tuple[int, int]]) -> None:
        """Steps done and in all of running processes, in one transaction; ended ones keep theirs."""
        with self._transaction() as db:
            for process in db.scalars(select(GenerativeProcess).where(
                    GenerativeProcess.id.in_(progress), GenerativeProcess.status == RunStatus.STARTED)):
                process.progress_step, process.progress_total = progress[process.id]

    def fail_process(self, process_id: int, message: str) -> None:
        """Mark the process ERROR with one `("Error details: ...", "str")` output row."""
        self._move(process_id, RunStatus.ERROR, [(ERROR_PREFIX + message, "str")])

    def _move(self, process_id: int, status: RunStatus, outputs: Iterable[tuple[str, str]] = ()) -> None:
        # One guarded UPDATE (`_move_to`) rather than loading the process and its rows: the
        # transitions are on every generation's path.
        with self.engine.begin() as db:  # Core, no ORM session: nothing is loaded
            moved = db.execute(_move_to(status), {"process_id": process_id, "now": utcnow()})
            if moved.rowcount != 1:
                current = db.scalar(_STATUS_OF, {"process_id": process_id})
                if current is None:
                    raise ProcessNotFound(process_id)
                raise InvalidTransition(process_id, current, status)
            rows = [{"process_id": process_id, "data": data, "data_type": data_type, "is_input": False}
                    for data, data_type in outputs]
            if rows:
                db.execute(_INSERT_OUTPUTS, rows)

    def recover(
        self, owner: str, max_attempts: int, exclude: Iterable[int] = ()
    ) -> tuple[list[GenerativeProcess], list[GenerativeProcess]]:
        """`owner`'s processes that are queued or running in the database but not in its hands
        (not in `exclude`): after a restart, all of them.

        A STARTED process goes back to DELIVERED, or to ERROR once it has been
        started `max_attempts` times (its generation keeps killing the server,
        or keeps being interrupted). Returns (processes to queue again,
        processes given up), in one transaction.
        """
        with self._transaction() as db:
            query = (
                select(GenerativeProcess)
                .where(GenerativeProcess.owner == owner)
                .where(GenerativeProcess.status.in_((RunStatus.DELIVERED, RunStatus.STARTED)))
                .where(GenerativeProcess.id.not_in(list(exclude)))
                .order_by(GenerativeProcess.id)
                .with_for_update()
            )
            queued, given_up = [], []
            now = utcnow()
            for process in db.scalars(query):
                if process.status is RunStatus.STARTED and process.attempts >= max_attempts:
                    process.status, process.end_time = RunStatus.ERROR, now
                    process.data.append(ProcessData(
                        data=f"{ERROR_PREFIX}interrupted {process.attempts} times while generating "
                             f"(server stopped or crashed); not retried again",
                        data_type="str", is_input=False,
                    ))
                    given_up.append(process)
                else:
                    if process.status is RunStatus.STARTED:
                        process.status, process.delivery_time = RunStatus.DELIVERED, now
                    queued.append(process)
                process.last_modified = now
        return queued, given_up

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
                    GenerativeProcess.end_time < cutoff).order_by(GenerativeProcess.id).limit(batch)))
                images = [row.data for process in ended for row in process.output if row.data_type == IMAGE_TYPE]
                for process in ended:
                    db.delete(process)
            self.remove_images(images)  # once the rows are gone: a failed delete leaves whole processes
            removed += len(ended)
            if len(ended) < batch:
                return removed

    def delete_process(self, process_id: int) -> None:
        """Delete the process, its rows and its image files."""
        with self._transaction() as db:
            process = self._load_process(db, process_id)
            images = [row.data for row in process.output if row.data_type == IMAGE_TYPE]
            db.delete(process)
        # Files go only once the rows are gone: a failed delete leaves a whole process.
        self.remove_images(images)

    def remove_images(self, file_names: Iterable[str]) -> None:
        """Remove image files by bare name; never anything outside the images' folder or prefix."""
        self.images.delete(file_names)

    @staticmethod
    def _load_process(db: Session, process_id: int) -> GenerativeProcess:
        process = db.get(GenerativeProcess, process_id)
        if process is None:
            raise ProcessNotFound(process_id)
        return process
