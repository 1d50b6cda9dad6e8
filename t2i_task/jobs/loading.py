"""Whether the model a request names is loaded in the model service, waiting for its load.

The model service loads a model the first time it is asked for (or at start,
t2i_task/generation/pool.py) in a thread of its own. Work for a model waits
here until it is loaded, so a pipeline call never waits for a load while calls
for other models could run: a live request waits at most `serving.model_load_wait_s`
(then 503 with Retry-After, and the load goes on), a queued process as long as
the load takes. What the service says is remembered for FRESH_S, so a request
for a loaded model costs no extra call; the default model is always loaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from t2i_task.jobs.failures import GenerationFailed, ModelLoading


POLL_S = 0.25  # how often a waiting request asks whether its model has loaded
FRESH_S = 2.0  # how long "loaded" is believed without asking again (the service may unload a model)
RETRY_AFTER_S = 5  # what a live request refused during a load is told


class ModelLoads:
    def __init__(self, load: Callable[[str], Awaitable[str]], default: str) -> None:
        """`load(name)` asks the model service to load a model if it has not, and answers its state:
        "loaded", "loading", or "failed: <why>"."""
        self._load, self.default = load, default
        self._loaded_at: dict[str, float] = {}

    async def ready(self, name: str, wait_s: float | None) -> None:
        """Return once `name` is loaded. ModelLoading if it still loads after `wait_s` (None: as long as
        it takes); GenerationFailed if its load failed."""
        if name == self.default or time.monotonic() - self._loaded_at.get(name, -FRESH_S) < FRESH_S:
            return
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            state = await self._load(name)
            if state == "loaded":
                self._loaded_at[name] = time.monotonic()
                return
            # A load may unload another model to make room: believe no other "loaded" without asking.
            self._loaded_at.clear()
            if state.startswith("failed"):
                raise GenerationFailed(f"model {name} could not be loaded ({state.removeprefix('failed: ')})")
            if deadline is not None and time.monotonic() >= deadline:
                raise ModelLoading(f"Model {name} is loading; retry in a few seconds.", RETRY_AFTER_S)
            await asyncio.sleep(POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic())))
