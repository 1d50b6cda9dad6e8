"""Tests decide when a server's generations run, instead of racing them.

A server started with `Gate.env()` loads `tests/server_hooks/sitecustomize.py`:
while the gate is closed, every pipeline call waits before it starts. A test
closes the gate, sends its requests, waits until they are where it wants them
(held in the pipeline, queued at the batcher) and opens it. What the server
does next follows from the order of events, not from how fast this machine is.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

HOOKS_DIR = Path(__file__).with_name("server_hooks")
# Generous: these waits detect a hang, they do not measure speed.
WAIT_S = 120


def wait_for(predicate, timeout: float = WAIT_S, interval: float = 0.05, what: str = "condition"):
    """The predicate's first truthy value; fails the test if none comes within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


def queued_at_model(url: str) -> int:
    """Requests handed to the model now (running, in its batcher, or waiting in the API process
    for the next call to it: t2i_task/jobs/model_calls.py), from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(r'^t2i_requests_at_model(?:{[^}]*})? (\S+)$', text, re.MULTILINE)
    return int(float(match[1])) if match else 0


def wait_until_queued_at_model(url: str, count: int) -> None:
    seen: list[int] = []
    try:
        wait_for(lambda: seen.append(queued_at_model(url)) or seen[-1] == count, what=f"{count} requests at the model")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; first seen {seen[:3]}, last seen {seen[-3:]}") from None


class Gate:
    """The gate of one test server; a file whose presence holds pipeline calls."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "gate"
        self.entered_log = folder / "gate.entered"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment that loads the hooks into a server started with it."""
        return {"PYTHONPATH": str(HOOKS_DIR), "T2I_TEST_GATE": str(self.path), **extra}

    def close(self) -> None:
        self.entered_log.unlink(missing_ok=True)
        self.path.touch()

    def open(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def closed(self):
        """Held calls go on when the block ends, even when it fails."""
        self.close()
        try:
            yield self
        finally:
            self.open()

    def held_calls(self) -> list[int]:
        """The image count of each pipeline call that waited at the gate since it closed."""
        if not self.entered_log.exists():
            return []
        return [int(line) for line in self.entered_log.read_text().split()]

    def wait_until_held(self, calls: int = 1) -> None:
        wait_for(lambda: len(self.held_calls()) >= calls, what=f"{calls} pipeline call(s) held at the gate")

    @contextmanager
    def holding_after_step(self, step: int):
        """A call that has run `step` steps waits there until the block ends (even when it fails)."""
        hold, held = self.path.with_name("gate.hold-after-step"), self.path.with_name("gate.held-at-step")
        held.unlink(missing_ok=True)
        hold.write_text(str(step))
        try:
            yield held.exists  # whether a call has got there (and so waits, while the block runs)
        finally:
            hold.unlink(missing_ok=True)
