"""What a DashAI session's parameters are checked against: its model's limits and adapters.

A session stores its known generation parameters, validated against its model (422 naming the
field), beside DashAI's own form values; a switch of model keeps what the user set and gives
the new model's defaults to what they never set.
"""

from __future__ import annotations

from typing import Any

from t2i_task.api.backend import Backend
from t2i_task.api.errors import ApiError, parameters_error
from t2i_task.config.models import ServedModel
from t2i_task.config.parameters import GenerationParameters, ParameterError
from t2i_task.config.settings import UnknownModel
from t2i_task.storage.tables import GenerativeSession

# Form values DashAI's front end keeps in a session's parameters beside the generation
# values: stored and shown back, never passed to the model.
SESSION_ATTRIBUTES = ("name", "description", "device")


def session_parameters(model: ServedModel, values: dict[str, Any]) -> dict[str, Any]:
    """What a session stores: its known generation parameters, validated against its model's
    limits (422 naming the field), plus DashAI's own form values; other keys are ignored, as
    DashAI ignores them."""
    try:
        params = model.validate_parameters({k: v for k, v in values.items() if k in GenerationParameters.model_fields})
    except ParameterError as exc:
        raise parameters_error(exc) from exc
    kept = {key: values[key] for key in SESSION_ATTRIBUTES if isinstance(values.get(key), str)}
    return params.model_dump() | kept


async def check_adapters(backend: Backend, model: ServedModel, parameters: dict[str, Any]) -> None:
    """422 naming `loras` and the available adapters when the parameters name one the model lacks."""
    try:
        await backend.check_adapters(model, parameters.get("loras"))
    except ParameterError as exc:
        raise parameters_error(exc) from exc


def session_model(backend: Backend, session: GenerativeSession) -> ServedModel:
    """The model a session generates with (the default where it names none)."""
    return served_model(backend, session.model_name)


def generation_parameters(model: ServedModel, session: GenerativeSession) -> GenerationParameters:
    """The generation values of a stored session (its other keys are not the model's business),
    checked against its model's limits today: a session stored under larger ones gets a 422 naming them."""
    known = {k: v for k, v in (session.parameters or {}).items() if k in GenerationParameters.model_fields}
    try:
        return model.validate_parameters(known)
    except ParameterError as exc:
        raise parameters_error(exc) from exc


def served_model(backend: Backend, model_name: str | None) -> ServedModel:
    """The model a DashAI route names; 400 "... is not registered." as DashAI answers, naming the served ones."""
    try:
        return backend.settings.served_model(model_name)
    except UnknownModel as exc:
        raise ApiError(400, str(exc), param="model_name") from None


def switched_parameters(old: ServedModel, new: ServedModel, stored: dict[str, Any]) -> dict[str, Any]:
    """A session's parameters for its new model: a value still at the old model's default was never
    chosen and takes the new model's; one the user set is kept, and must suit the new model (422)."""
    old_defaults, new_defaults = old.defaults.model_dump(), new.defaults.model_dump()
    values = {key: new_defaults[key] if key in old_defaults and value == old_defaults[key] else value
              for key, value in stored.items()}
    return session_parameters(new, values)
