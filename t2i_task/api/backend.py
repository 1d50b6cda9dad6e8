"""What every route works with: the settings, the store, the task's adapters and the
process queue. `service.py` builds one per API worker and puts it on the app's state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from t2i_task.config.settings import Settings
from t2i_task.jobs.processes import ProcessQueue
from t2i_task.storage.store import Store
from t2i_task.task import TextToImageGenerationTask

logger = logging.getLogger(__name__)


@dataclass
class Backend:
    settings: Settings
    store: Store
    task: TextToImageGenerationTask
    queue: ProcessQueue
    # The session that records each model's OpenAI calls, by model name, once looked up.
    openai_sessions: dict[str, int] = field(default_factory=dict)

    async def db(self, call, *args, **kwargs):
        """Run a blocking store call off the event loop."""
        return await self.queue.db(call, *args, **kwargs)

    async def loaded_models(self) -> dict[str, int]:
        """The models loaded in the model service now (their weights' bytes); {} if it cannot say."""
        try:
            return await self.queue.model.loaded()
        except Exception as exc:  # starting or stopping: the list says "not loaded" for now
            logger.debug("loaded models unavailable: %s", type(exc).__name__)
            return {}


async def _backend(request: Request) -> Backend:  # async: FastAPI runs a plain function in a thread
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(_backend)]
