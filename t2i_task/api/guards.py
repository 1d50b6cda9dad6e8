"""ASGI guards in front of every route, BentoML's own included: an answer for every
request whose handler fails, API keys, a body size limit, and JSON for the errors
BentoML's own router answers in plain text.

They answer in the error shape of the route they guard: OpenAI's
`{"error": {...}}` under `/v1/`, `{"detail": ...}` elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable

from starlette.exceptions import HTTPException

from t2i_task.config.keys import KeyRing

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
logger = logging.getLogger("t2i.http")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_payload(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The one error shape rule: OpenAI's under `/v1/`, FastAPI's `detail` (plus `field`) elsewhere."""
    if is_openai_path(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message, **({"field": param} if param else {})}


async def send_error(send, path: str, status: int, message: str, code: str | None = None,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_payload(path, status, message, code=code)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


class StartWatchingSend:
    """A `send` that notes whether the response has started (after that, no error answer fits)."""

    def __init__(self, send) -> None:
        self.send, self.started = send, False

    async def __call__(self, event) -> None:
        self.started = self.started or event["type"] == "http.response.start"
        await self.send(event)


class AnswerFailuresMiddleware:
    """A handler that raises before it answers gets a JSON error: 503 for /readyz (BentoML's
    probe raises while the model service is still loading), 500 elsewhere.

    Without it the request never ends: BentoML's timeout middleware waits for a response
    until `serving.request_timeout_s`, and uvicorn waits for that request on SIGTERM, so
    one readiness probe during loading kept a server from stopping.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        watched = StartWatchingSend(send)
        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if watched.started:
                raise
            path = scope["path"]
            if path == "/readyz":
                logger.debug("not ready: %s", describe(exc))
                return await send_error(send, path, 503, f"Not ready: {describe(exc)}.")
            logger.exception("%s %s failed", scope.get("method"), path)
            await send_error(send, path, 500, f"Internal error ({type(exc).__name__}).")


def describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (what the openai client sends) when keys are configured,
    and tells the routes whose key it is (`request.state.caller`, a Caller; None with no keys).

    Probes stay open so orchestrators need no secret, and so do the paths `public` names (a
    web page and its assets, which a browser loads without a header). Keys are compared in
    constant time and never logged (t2i_task/config/keys.py).
    """

    def __init__(self, app, keys: KeyRing, public: Callable[[str], bool] = lambda path: False,
                 signed: Callable[[str, bytes], bool] = lambda path, query: False) -> None:
        self.app = app
        self.keys = keys
        self.public = public
        self.signed = signed  # a signed link's request: its route checks the signature (t2i_task/api/links.py)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["caller"], state["keys_required"] = None, self.keys.enabled
        if not self.keys.enabled or scope["path"] in OPEN_PATHS or self.signed(scope["path"], scope["query_string"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, presented = header.partition(b" ")
        caller = self.keys.caller(presented.strip().decode("latin-1")) if scheme.lower() == b"bearer" else None
        if caller is not None or self.public(scope["path"]):  # a public page's calls may still carry a key
            state["caller"] = caller
            return await self.app(scope, receive, send)
        await send_error(send, scope["path"], 401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])


class BodySizeLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413, before a route parses them; the paths in
    `route_limits` (uploads) have their own limit."""

    def __init__(self, app, max_bytes: int, route_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.route_limits = route_limits or {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.route_limits.get(scope["path"].rstrip("/"), self.max_bytes)
        message = f"Request body is larger than {max_bytes} bytes."
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await send_error(send, scope["path"], 413, message)

        received = 0

        async def counting_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > max_bytes:
                    # A body without a length: the route's framework answers 413.
                    raise HTTPException(status_code=413, detail=message)
            return event

        watched = StartWatchingSend(send)
        try:
            await self.app(scope, counting_receive, watched)
        except HTTPException as exc:
            if exc.status_code != 413 or watched.started:
                raise
            await send_error(send, scope["path"], 413, message)


class JsonRouteErrorsMiddleware:
    """Paths under this API's prefixes that no route matches (BentoML's outer
    router answers them in plain text) get a JSON error instead."""

    def __init__(self, app, prefixes: tuple[str, ...] = ("/api/", "/v1/")) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return await self.app(scope, receive, send)
        replaced_status: int | None = None

        async def json_send(event):
            nonlocal replaced_status
            if event["type"] == "http.response.start":
                content_type = dict(event.get("headers", [])).get(b"content-type", b"")
                if event["status"] in (404, 405) and not content_type.startswith(b"application/json"):
                    replaced_status = event["status"]
                    return
            elif replaced_status is not None:
                if not event.get("more_body"):
                    message = (f"No route {scope['path']}." if replaced_status == 404
                               else f"Method {scope['method']} is not allowed on {scope['path']}.")
                    await send_error(send, scope["path"], replaced_status, message)
                return
            await send(event)

        await self.app(scope, receive, json_send)
