"""The inference server's queued API, as the DashAI model uses it. Nothing of DashAI here.

A generation is a process of a session on the server. The session holds the
parameters (one per model and parameter set, found again by its name, so
DashAI's processes do not each leave a session behind); the process holds the
prompt and is run by the server's queue. The client polls the process until it
ends, so no HTTP call lasts longer than one poll however long the generation
takes, and fetches the images in order.

Every failure is a `ServerError` whose message a DashAI user can act on:
DashAI shows it in the chat as "Error details: <message>".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any

from urllib.parse import urlsplit

import httpx
from PIL import Image

DEFAULT_URL = "http://127.0.0.1:3000"
TASK = "TextToImageGenerationTask"
FINISHED, ERROR = 3, 4
DEFAULT_RETRY_AFTER_S = 5.0
MAX_RETRY_AFTER_S = 60.0


class ServerError(RuntimeError):
    """A failure, told in words a DashAI user can act on.

    DashAI 0.10.0 shows a text-to-image process's output rows through
    `os.path.basename` (they are meant to be image file names), which cuts a
    message after its last "/". So messages name the server by host:port, and
    any "/" passed through (a server's sentence) becomes "∕" (U+2215), which
    reads the same and survives.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("/", "\u2215"))


def configured_url() -> str:
    """The server DashAI's process is pointed at: T2I_SERVER_URL, else a local one."""
    return os.environ.get("T2I_SERVER_URL") or DEFAULT_URL


def _detail(response: httpx.Response) -> str:
    """The server's reason: `detail` on DashAI's routes, `error.message` on OpenAI's, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("detail"), str):
            return body["detail"]
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return json.dumps(body)[:300]


def _retry_after(response: httpx.Response) -> float:
    try:
        seconds = float(response.headers.get("retry-after", DEFAULT_RETRY_AFTER_S))
    except ValueError:  # an HTTP date: not what this server sends
        seconds = DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.1), MAX_RETRY_AFTER_S)


class InferenceServer:
    """One server: its address, the key DashAI's environment gives, and how long to wait."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        max_wait_s: float = 1800.0,
        retries: int = 5,
        call_timeout_s: float = 30.0,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        self.where = urlsplit(self.url).netloc or self.url  # host:port, what messages name
        self.api_key = api_key or None
        self.max_wait_s, self.retries, self.call_timeout_s = max_wait_s, retries, call_timeout_s
        self.poll_interval_s = poll_interval_s
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=call_timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, deadline: float | None = None, **kwargs: Any) -> httpx.Response:
        """One call, with busy answers (429, 503) retried after the server's Retry-After."""
        for attempt in range(1, self.retries + 2):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                raise ServerError(f"The inference server at {self.where} did not answer within "
                                  f"{self.call_timeout_s:g} s.") from exc
            except httpx.TransportError as exc:
                raise ServerError(f"Cannot reach the inference server at {self.where} ({type(exc).__name__}: {exc}). "
                                  "Is it running, and is T2I_SERVER_URL right?") from exc
            status = response.status_code
            if status in (401, 403):
                problem = ("is missing: set T2I_API_KEY in DashAI's environment" if not self.api_key
                           else "in T2I_API_KEY is wrong: check it against the server's keys")
                raise ServerError(f"The inference server at {self.where} refused the request ({status}): "
                                  f"the API key {problem}.")
            if status in (429, 503):
                wait = _retry_after(response)
                in_time = deadline is None or time.monotonic() + wait < deadline
                if attempt <= self.retries and in_time:
                    time.sleep(wait)
                    continue
                raise ServerError(f"The inference server at {self.where} is busy ({status}: {_detail(response)}); "
                                  f"gave up after {attempt} {'try' if attempt == 1 else 'tries'}.")
            if status >= 400:
                raise ServerError(f"The inference server at {self.where} refused the request ({status}): "
                                  f"{_detail(response)}")
            return response
        raise AssertionError("unreachable")

    # What the server serves

    def model_form(self, model: str | None = None) -> dict[str, Any]:
        """The served model's DashAI component (name and parameter schema); None: the default model."""
        served = self.request("GET", "/api/v1/component/", params={"related_component": TASK}).json()
        if not served:
            raise ServerError(f"The inference server at {self.where} serves no text-to-image model.")
        if model is None:
            return served[0]
        for component in served:
            if component["name"] == model:
                return component
        names = ", ".join(component["name"] for component in served)
        raise ServerError(f"The inference server at {self.where} does not serve the model {model!r}; it serves: {names}.")

    # Generating

    def session_id(self, model: str, parameters: dict[str, Any], deadline: float | None = None) -> int:
        """The server's session for this model and parameter set, created the first time."""
        digest = hashlib.sha256(json.dumps([model, parameters], sort_keys=True).encode()).hexdigest()[:12]
        name = f"DashAI {model} {digest}"
        body = {"task_name": TASK, "model_name": model, "name": name, "parameters": parameters}
        try:
            return self.request("POST", "/api/v1/generative-session/", deadline, json=body).json()["id"]
        except ServerError as exc:
            if "(409)" not in str(exc):  # 409: a session of that name exists, so the same parameters
                raise
        for session in self.request("GET", "/api/v1/generative-session/", deadline).json():
            if session["name"] == name:
                return session["id"]
        raise ServerError(f"The inference server at {self.where} has a session named {name!r} but does not list it.")

    def generate(self, prompt: str, model: str | None, parameters: dict[str, Any]) -> list[Image.Image]:
        """The images the server makes for `prompt`, in order; waits at most `max_wait_s` in all."""
        deadline = time.monotonic() + self.max_wait_s
        model = model or self.model_form()["name"]
        session = self.session_id(model, parameters, deadline)
        process = self.request("POST", "/api/v1/generative-process/", deadline,
                               json={"session_id": session, "input": [prompt]}).json()
        process = self._wait_until_ended(process, deadline)
        if process["status"] == ERROR:
            reasons = [row["data"].removeprefix("Error details: ") for row in process["output"]]
            raise ServerError(f"The inference server at {self.where} could not generate the images "
                              f"(process {process['id']}): {'; '.join(reasons) or 'no reason given'}")
        return [self._image(row["data"], deadline) for row in process["output"]]

    def _wait_until_ended(self, process: dict[str, Any], deadline: float) -> dict[str, Any]:
        interval = self.poll_interval_s
        while process["status"] not in (FINISHED, ERROR):
            if time.monotonic() + interval > deadline:
                raise ServerError(f"Gave up after {self.max_wait_s:g} s waiting for process {process['id']} on the "
                                  f"inference server at {self.where}; it may still finish there (T2I_MAX_WAIT_S sets "
                                  "the limit).")
            time.sleep(interval)
            interval = min(interval * 1.5, 2.0)
            process = self.request("GET", f"/api/v1/generative-process/{process['id']}", deadline).json()
        return process

    def _image(self, name: str, deadline: float) -> Image.Image:
        response = self.request("GET", f"/api/v1/generative-process/image/{name}", deadline)
        image = Image.open(io.BytesIO(response.content))
        image.load()
        return image
