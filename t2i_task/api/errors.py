"""Client-facing errors: one exception, and handlers that answer it in the caller's shape
(OpenAI's `{"error": {...}}` under `/v1/`, DashAI's `{"detail": ...}` elsewhere)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i_task.api.guards import error_payload, is_openai_path
from t2i_task.config.parameters import ParameterError
from t2i_task.jobs.failures import DiskLow, ModelLoading, QueueFull, ShuttingDown
from t2i_task.storage.store import NotFoundError

logger = logging.getLogger("t2i.api")
RETRY_AFTER_S = 5


class ApiError(Exception):
    """A client-facing error: status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def retry_later(status: int, message: str, after_s: float = RETRY_AFTER_S) -> ApiError:
    return ApiError(status, message, headers={"Retry-After": str(max(1, math.ceil(after_s)))})


def field_errors(exc: ValidationError | RequestValidationError) -> list[tuple[str, str]]:
    """(field, message) pairs; the field is the dotted path without FastAPI's 'body'/'query' prefix."""
    pairs = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if part not in ("body", "query", "path", "form")]
        pairs.append((".".join(location) or "body", error["msg"]))
    return pairs


def validation_error(exc: ValidationError, status: int = 422) -> ApiError:
    errors = field_errors(exc)
    return ApiError(status, "; ".join(f"{field}: {message}" for field, message in errors), param=errors[0][0])


def parameters_error(exc: ParameterError) -> ApiError:
    """A 422 naming the parameter that broke a limit or a type."""
    return ApiError(422, str(exc), param=exc.field)


@contextmanager
def admission() -> Iterator[None]:
    """The queue's refusals as HTTP answers: 429 when full (Retry-After: the queue's estimate
    where it has one), 503 when shutting down or while the model asked for is still loading, 507
    when a disk is low."""
    try:
        yield
    except QueueFull as exc:
        raise retry_later(429, str(exc), exc.retry_after_s or RETRY_AFTER_S) from exc
    except ShuttingDown as exc:
        raise retry_later(503, str(exc)) from exc
    except ModelLoading as exc:
        raise retry_later(503, str(exc), exc.retry_after_s) from exc
    except DiskLow as exc:
        raise ApiError(507, str(exc)) from exc


def _response(request: Request, error: ApiError) -> JSONResponse:
    body = error_payload(request.url.path, error.status, error.message, param=error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc)
        message = "; ".join(f"{field}: {text}" for field, text in errors)
        status = 400 if is_openai_path(request.url.path) else 422  # OpenAI answers 400, FastAPI/DashAI 422
        return _response(request, ApiError(status, message, param=errors[0][0] if errors else None))

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return _response(request, ApiError(404, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _response(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The pool re-checks connections (pool_pre_ping), so the next request after
        # the database returns succeeds: nothing to restart.
        logger.warning("database unavailable: %s", type(exc).__name__)
        return _response(request, retry_later(503, "Database unavailable; retry later."))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still JSON, in the caller's error shape; the traceback goes to the log.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _response(request, ApiError(500, f"Internal error: {type(exc).__name__}"))
