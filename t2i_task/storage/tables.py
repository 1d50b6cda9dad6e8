"""DashAI's generative tables as SQLAlchemy 2 typed models.

Table and column names follow DashAI's own (`generative_session`,
`parameter_history`, `generative_process`, `process_data`), so a DashAI database
and this server's read the same.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (JSON, DateTime, Enum, Float, ForeignKey, Index, SmallInteger, String, Text, TypeDecorator,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use t2i_task.storage.tables.utcnow()")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class RunStatus(enum.IntEnum):
    """A process's state; DashAI's API reports the integer."""

    NOT_STARTED = 0
    DELIVERED = 1
    STARTED = 2
    FINISHED = 3
    ERROR = 4


class Priority(enum.IntEnum):
    """How soon a process goes to the model (stored with it; lower first)."""

    LIVE = 0  # a client waits on the connection for the images
    QUEUED = 1  # a stored process; its client polls
    BULK = 2  # a line of a bulk job (OpenAI's Batch API): whenever nothing else needs the model


def account_column():
    """Not in DashAI's tables: whose a row is, the name of the API key that made it (t2i_task/config/keys.py);
    "" with no keys, and for rows made before keys had names. Every route answers only its own
    caller's rows (an admin's: all)."""
    return mapped_column(String(255), default="", server_default="", index=True)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class GenerativeSession(Base):
    __tablename__ = "generative_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_modified: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    task_name: Mapped[str] = mapped_column(String(255))
    model_name: Mapped[str | None] = mapped_column(String(255))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    account: Mapped[str] = account_column()

    # A name is unique among its owner's sessions: another owner's names are not there for them.
    __table_args__ = (UniqueConstraint("account", "name", name="uq_generative_session_account_name"),)

    processes: Mapped[list[GenerativeProcess]] = relationship(
        back_populates="session", cascade="all, delete-orphan", passive_deletes=True
    )
    parameter_history: Mapped[list[GenerativeSessionParameterHistory]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="GenerativeSessionParameterHistory.id"
    )


class GenerativeSessionParameterHistory(Base):
    __tablename__ = "parameter_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("generative_session.id", ondelete="CASCADE"), index=True)
    parameters: Mapped[dict[str, Any]]
    modified_at: Mapped[datetime] = mapped_column(default=utcnow)


class GenerativeProcess(Base):
    __tablename__ = "generative_process"

    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("generative_session.id", ondelete="CASCADE"), index=True)
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, native_enum=False, length=16, validate_strings=True), default=RunStatus.NOT_STARTED, index=True
    )
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_modified: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    delivery_time: Mapped[datetime | None]
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    # Not in DashAI's table: which server instance queued the process, and how
    # often it was started, so that an instance restarted after a crash can
    # re-queue its own interrupted work and give up on work that keeps failing.
    owner: Mapped[str | None] = mapped_column(String(255), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    # Not in DashAI's table either: denoising steps done and in all. A running process's
    # are written about once a second, so that any replica can say how far it is.
    progress_step: Mapped[int | None]
    progress_total: Mapped[int | None]
    # Nor this: what the process runs with, resolved when it was created (its model and every
    # generation parameter), so that it runs as asked whatever its session says by then, on a
    # restart or on another replica. Null for processes stored before release 0.4.
    parameters: Mapped[dict[str, Any] | None]
    # Nor these: until when the owner holds the process (it renews the lease while the process is
    # in its hands; once the lease has expired any replica may take the process), and its Priority,
    # so that what waits can be counted by priority for autoscaling. Null for processes stored
    # before release 0.4 (their owner alone takes them back).
    lease_expires: Mapped[datetime | None] = mapped_column(index=True)
    priority: Mapped[int | None] = mapped_column(SmallInteger)
    # Nor these: the bulk job (OpenAI batch, the `batch` table) a process is a line of, and the line's
    # custom_id, unique within its batch: each line is one process, so each has one result. (No
    # foreign key: adding one rebuilds the table on SQLite; a batch's lines are deleted with it.)
    batch_id: Mapped[str | None] = mapped_column(String(64), index=True)
    custom_id: Mapped[str | None] = mapped_column(String(512))
    account: Mapped[str] = account_column()  # its session's (never changes): lists and images need no join

    __table_args__ = (Index("uq_generative_process_batch_line", "batch_id", "custom_id", unique=True),)

    session: Mapped[GenerativeSession] = relationship(back_populates="processes")
    # Loaded with the process: every reader wants its input and output rows.
    data: Mapped[list[ProcessData]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="ProcessData.id", lazy="selectin"
    )

    @property
    def input(self) -> list[ProcessData]:
        return [row for row in self.data if row.is_input]

    @property
    def output(self) -> list[ProcessData]:
        return [row for row in self.data if not row.is_input]


class KeyUsage(Base):
    """Not in DashAI's tables: what each owner (API key name) has used, added to as each of its
    generations finishes: images made, and model-seconds (each generation's cost by its model's
    calibration, what the scheduler charges it). Deleting work does not take usage back."""

    __tablename__ = "key_usage"

    account: Mapped[str] = mapped_column(String(255), primary_key=True)
    images: Mapped[int] = mapped_column(default=0)
    model_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class ServerSecret(Base):
    """Not in DashAI's tables: a secret every replica shares, made once and kept (the key that signs image
    links, so that a link made before a restart, or by another replica, still loads)."""

    __tablename__ = "server_secret"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class ProcessData(Base):
    """One input or output item of a process: `data` and its `data_type` ("str" or "Image")."""

    __tablename__ = "process_data"

    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[str] = mapped_column(Text)
    data_type: Mapped[str] = mapped_column(String(32))
    process_id: Mapped[int | None] = mapped_column(ForeignKey("generative_process.id", ondelete="CASCADE"), index=True)
    is_input: Mapped[bool] = mapped_column(default=True)

    # An image's row by its file name: whose the image is, at each fetch with keys on. A hash index on
    # PostgreSQL: a B-tree entry cannot hold the longest texts (an error message).
    __table_args__ = (Index("ix_process_data_data", "data", postgresql_using="hash"),)


class StoredFile(Base):
    """A file of OpenAI's Files API: a batch's input lines, or its output or error lines. Its bytes are
    kept with the images (t2i_task/storage/files.py), under its id."""

    __tablename__ = "stored_file"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int]
    created: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    account: Mapped[str] = account_column()


class Batch(Base):
    """A bulk job (OpenAI's Batch API): its lines are processes (GenerativeProcess.batch_id), its
    state OpenAI's. While a replica writes its results (`finalizing`) it holds the batch under a
    lease, so a replica that dies there is replaced by another."""

    __tablename__ = "batch"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    endpoint: Mapped[str] = mapped_column(String(255))
    completion_window: Mapped[str] = mapped_column(String(16))
    input_file_id: Mapped[str] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    total: Mapped[int]
    created: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    in_progress_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    owner: Mapped[str | None] = mapped_column(String(255))  # the replica writing its results
    lease_expires: Mapped[datetime | None]
    account: Mapped[str] = account_column()
