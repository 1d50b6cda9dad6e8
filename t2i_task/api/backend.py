"""What every route works with: the settings, the store, the task's adapters and the
process queue. `service.py` builds one per API worker and puts it on the app's state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import ParameterError, lora_list
from t2i_task.config.settings import Settings
from t2i_task.generation.adapters import NOT_CHECKED as ADAPTER_NOT_CHECKED
from t2i_task.generation.adapters import OK as ADAPTER_OK
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

    async def adapters(self) -> dict[str, dict[str, str]]:
        """Each model's LoRA adapters and their status, from the model service; {} if it cannot say."""
        try:
            return await self.queue.model.adapters()
        except Exception as exc:  # starting or stopping
            logger.debug("adapters unavailable: %s", type(exc).__name__)
            return {}

    async def check_adapters(self, model: ServedModel, loras: str | None) -> None:
        """ParameterError naming `loras` and the model's available adapters if it names one the model
        does not have, or one whose file does not load."""
        if lora_list(loras):
            check_adapters(await self.adapters(), model, loras)

    async def loaded_models(self) -> dict[str, int]:
        """The models loaded in the model service now (their weights' bytes); {} if it cannot say."""
        try:
            return await self.queue.model.loaded()
        except Exception as exc:  # starting or stopping: the list says "not loaded" for now
            logger.debug("loaded models unavailable: %s", type(exc).__name__)
            return {}


def check_adapters(adapters: dict[str, dict[str, str]], model: ServedModel, loras: str | None) -> None:
    """`Backend.check_adapters` with the adapters' status already in hand (a batch's lines)."""
    status = adapters.get(model.name, {})
    usable = [name for name, state in status.items() if state in (ADAPTER_OK, ADAPTER_NOT_CHECKED)]
    for name, _ in lora_list(loras):
        if name not in usable:
            why = f" ({status[name]})" if name in status else ""
            raise ParameterError("loras", f"the adapter {name!r} is not available for {model.name}{why}; "
                                          f"available: {', '.join(usable) or 'none'}")


async def _backend(request: Request) -> Backend:  # async: FastAPI runs a plain function in a thread
    return request.app.state.backend


BackendDep = Annotated[Backend, Depends(_backend)]
