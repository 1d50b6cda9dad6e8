"""Why a generation did not happen: the exceptions the queue raises and the APIs answer,
and the sentence an ERROR process stores."""

from __future__ import annotations

import json
from pathlib import Path


class QueueFull(Exception):
    """More generations are admitted than `serving.max_queued_generations`, or a live request
    could not finish in time behind the work already waiting: retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DiskLow(Exception):
    """A local disk this server writes to has less free space than `storage.min_free_mb`: no new work."""


class ShuttingDown(Exception):
    """The server is draining: no new work."""


class ModelLoading(Exception):
    """A live request's model is still loading after the wait it may have (`serving.model_load_wait_s`);
    the load goes on: retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelUnavailable(Exception):
    """The model service cannot be reached (it is stopping, or restarting after a crash):
    not the process's fault, so a queued process goes back to the queue."""


class ClientGone(Exception):
    """The caller of a live request disconnected; its generation was cancelled."""


class ProcessEnded(Exception):
    """The process has already ended, or cannot be cancelled from here."""


class GenerationFailed(Exception):
    """The model could not generate a request (out of memory even when run alone, say)."""


def describe_failure(exc: BaseException) -> str:
    """The reason stored in an ERROR process's output row: a sentence a person can read."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{type(exc).__name__}: {exc.strerror} ({Path(exc.filename).name})"
    message = str(exc) or type(exc).__name__
    # BentoML's client raises with the model service's JSON body as its message,
    # e.g. {"error": "Not able to process the request in 600.0 seconds"}: keep the sentence.
    try:
        body = json.loads(message)
    except ValueError:
        return message
    reason = body.get("error") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) and reason else message
