"""What the store raises: a client's request names something missing or asks a move a process cannot make."""

from __future__ import annotations

from t2i_task.storage.tables import RunStatus


class StoreError(Exception):
    """Base class of the store's errors."""


class NotFoundError(StoreError, LookupError):
    pass


class SessionNotFound(NotFoundError):
    def __init__(self, session_id: int) -> None:
        super().__init__(f"Session with ID {session_id} does not exist.")
        self.session_id = session_id


class ProcessNotFound(NotFoundError):
    def __init__(self, process_id: int) -> None:
        super().__init__(f"Process with ID {process_id} does not exist.")
        self.process_id = process_id


class DuplicateSessionName(StoreError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"A session named {name!r} already exists.")
        self.name = name


class InvalidTransition(StoreError, ValueError):
    def __init__(self, process_id: int, current: RunStatus, wanted: RunStatus) -> None:
        super().__init__(f"Process {process_id} is {current.name}; it cannot become {wanted.name}.")


class LeaseLost(StoreError):
    """A replica's write to a process another replica has taken over (its lease had expired), or
    that ended meanwhile: the write is not made."""

    def __init__(self, process_id: int, holder: str | None) -> None:
        super().__init__(f"Process {process_id} is no longer held here: "
                         + (f"replica {holder!r} holds it." if holder else "it was released."))
        self.process_id, self.holder = process_id, holder


class FileNotFound(NotFoundError):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"No such File object: {file_id}")
        self.file_id = file_id


class BatchNotFound(NotFoundError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No such Batch object: {batch_id}")
        self.batch_id = batch_id
