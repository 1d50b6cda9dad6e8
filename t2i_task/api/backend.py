"""What every route works with: the settings, the store, the task's adapters and the
process queue. `service.py` builds one per API worker and puts it on the app's state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from t2i_task.api.links import LinkSigner
from t2i_task.config.keys import Caller
from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import ParameterError, lora_list
from t2i_task.config.settings import Settings
from t2i_task.generation.adapters import NOT_CHECKED as ADAPTER_NOT_CHECKED
from t2i_task.generation.adapters import OK as ADAPTER_OK
from t2i_task.jobs.failures import QueueFull
from t2i_task.jobs.processes import ProcessQueue
from t2i_task.jobs.scheduler import Priority
from t2i_task.storage.scope import Scope
from t2i_task.storage.store import Store
from t2i_task.task import TextToImageGenerationTask

logger = logging.getLogger(__name__)


@dataclass
class Backend:
    settings: Settings
    store: Store
    task: TextToImageGenerationTask
    queue: ProcessQueue
    links: LinkSigner
    # The session that records each model's OpenAI calls, by (model name, account), once looked up.
    openai_sessions: dict[tuple[str, str], int] = field(default_factory=dict)

    async def db(self, call, *args, **kwargs):
        """Run a blocking store call off the event loop."""
        return await self.queue.db(call, *args, **kwargs)

    async def check_share(self, owner: Owner) -> None:
        """QueueFull (429) when the caller's key has `serving.max_queued_per_key` generations queued or
        running already: that key waits, the others go on."""
        cap = self.settings.serving.max_queued_per_key
        if cap is None or owner.caller is None:
            return
        waiting = await self.db(self.store.unended_of, owner.account)
        if waiting >= cap:
            raise QueueFull(f"Your key has {waiting} generations queued or running, its share of this server "
                            f"(serving.max_queued_per_key: {cap}); retry when some have finished.",
                            retry_after_s=self.queue.scheduler.waiting_s(Priority.QUEUED) or None)

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


@dataclass(frozen=True)
class Owner:
    """Whose work a request sees and makes: `account` is recorded on what it creates, `scope` the
    accounts whose rows it may read or change (None: every row)."""

    account: str
    scope: Scope
    caller: Caller | None = None


async def owner_of(request: Request, backend: BackendDep) -> Owner:  # async: see _backend
    """The request's owner, from its key (ApiKeyMiddleware): with no keys configured the server has
    one user, who sees everything; an admin key sees everything too; a user's key sees its own rows,
    and the rows made before keys had names if `serving.unnamed_rows_owner` names it."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:  # no keys: one user, who sees all; keys on: a page or signed link, which see nothing here
        return Owner("", () if getattr(request.state, "keys_required", False) else None)
    if caller.is_admin:
        return Owner(caller.name, None, caller)
    unnamed = ("",) if caller.name == backend.settings.serving.unnamed_rows_owner else ()
    return Owner(caller.name, (caller.name, *unnamed), caller)


OwnerDep = Annotated[Owner, Depends(owner_of)]
