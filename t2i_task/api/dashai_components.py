"""DashAI's component registry, as far as this server serves it: the text-to-image task
and the served model, whose form (JSON schema) DashAI's front end builds its
generation settings from.

The sections of DashAI this server does not serve (datasets, predictive models,
folders, credentials) answer an empty list, so DashAI's front end loads without errors.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Query

from t2i_task.api.backend import Backend, BackendDep
from t2i_task.api.errors import ApiError
from t2i_task.config.models import ServedModel
from t2i_task.task import TextToImageGenerationTask

router = APIRouter()

TASK_NAME = TextToImageGenerationTask.__name__
# DashAI's component types: the ones this server has are listed, the others are empty.
COMPONENT_TYPES = (
    "Task", "Model", "Metric", "Dataloader", "Converter", "Explorer", "Explainer", "GlobalExplainer",
    "LocalExplainer", "Optimizer", "Job", "GenerativeTask", "GenerativeModel",
)
# Sections of DashAI's app that this server does not serve.
EMPTY_SECTIONS = ("model-session", "dataset", "folder", "credential", "experiment", "run", "explainer",
                  "explorer", "pipeline", "notebook", "plugin")


@functools.cache
def devices() -> list[str]:
    """DashAI's device choices: "CPU", then "GPU i: <name>" for each visible GPU."""
    import torch

    return ["CPU", *(f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))]


# DashAI 0.10.0's forms mark a text box holding "" as "a required field" (in red), and its
# session-creation form starts each field at its `placeholder`, or at "" when that is null. So an
# optional text starts as a blank (" "; the server stores "" or a blank as null, meaning none), and
# its null option comes first: given [text, null], the form flattens the field into a text box
# whose validation refuses the null the server stores, so UPDATE would fail.
BLANK = " "


def _form_property(schema: dict[str, Any], default: Any) -> dict[str, Any]:
    """One form field as pydantic writes it, showing the default as `placeholder` (DashAI's
    front end starts its form there)."""
    field = schema | {"default": default, "placeholder": default}
    options = schema.get("anyOf", [])
    if any(option.get("type") == "null" for option in options):
        field["anyOf"] = sorted(options, key=lambda option: option.get("type") != "null")
        if default is None:
            field["placeholder"] = BLANK
    return field


def model_schema(model: ServedModel, adapters: list[str] | None = None) -> dict[str, Any]:
    """A served model's form, built from the pydantic model that validates its parameters; its
    `loras` text field names the model's `adapters` (DashAI's form cannot edit a list of objects)."""
    schema = model.parameters_model.model_json_schema()
    defaults = model.defaults.model_dump()
    properties = {name: _form_property(field, defaults[name]) for name, field in schema["properties"].items()}
    names = ", ".join(adapters or []) or "none"
    properties["loras"]["description"] = f"{properties['loras']['description']} This model's adapters: {names}."
    properties["loras"]["examples"] = [f"{name}:1" for name in adapters or []]
    choices = devices()
    properties["device"] = {
        "type": "string", "title": "Device", "enum": choices, "default": choices[-1], "placeholder": choices[-1],
        "description": "Where DashAI would run the model; this server runs it on its own device, so this is "
                       "kept with the session and not used.",
    }
    return {"type": "object", "title": model.name, "properties": properties,
            "description": schema.get("description")}


def task_component() -> dict[str, Any]:
    metadata = TextToImageGenerationTask.get_metadata()
    return {
        "name": TASK_NAME,
        "type": "GenerativeTask",
        "class": TASK_NAME,
        "parent": None,
        "description": "Generate images from a text prompt with a diffusion model.",
        "display_name": "Text to Image",  # as DashAI names its task
        "configurable_object": False,
        "schema": {},
        "downloaded": True,
        "metadata": metadata | {
            "inputs": {"str": {"min": 1, "max": 1}},
            "outputs": {"Image": {"min": 1, "max": "n"}},
            "entry_point": "generic",
        },
    }


def model_component(model: ServedModel, adapters: list[str]) -> dict[str, Any]:
    name = model.name
    sizes = f" Draws {model.sizes.native}x{model.sizes.native} best." if model.sizes else ""
    return {
        "name": name,
        "type": "GenerativeModel",
        "class": name,
        "parent": "TextToImageGenerationTaskModel",
        "description": f"{name}, served by this inference server: loaded once, batched across users.{sizes}",
        "display_name": name,
        "configurable_object": True,
        "schema": model_schema(model, adapters),
        "downloaded": True,
        "metadata": {
            "task": [TASK_NAME],
            "compatible_components": [TASK_NAME],
            "requires_download": False,
            "download_size_bytes": 0,
        },
    }


async def components(backend: Backend) -> list[dict[str, Any]]:
    adapters = await backend.adapters()
    usable = {model: [name for name, status in found.items() if not status.startswith("unavailable")]
              for model, found in adapters.items()}
    return [task_component(), *(model_component(model, usable.get(model.name, []))
                                for model in backend.settings.served_models)]


@router.get("/api/v1/component/")
@router.get("/api/v1/component", include_in_schema=False)
async def list_components(
    backend: BackendDep,
    select_types: Annotated[list[str] | None, Query()] = None,
    ignore_types: Annotated[list[str] | None, Query()] = None,
    related_component: str | None = None,
    component_parent: str | None = None,
    has_related_of_type: str | None = None,
) -> list[dict[str, Any]]:
    for param, types in (("select_types", select_types), ("ignore_types", ignore_types)):
        unknown = sorted(set(types or ()) - set(COMPONENT_TYPES))
        if unknown:
            raise ApiError(422, f"{param}: unknown component type(s) {', '.join(unknown)}; "
                                f"known: {', '.join(COMPONENT_TYPES)}", param=param)
    everything = await components(backend)
    found = everything
    if select_types:
        found = [c for c in found if c["type"] in select_types]
    if ignore_types:
        found = [c for c in found if c["type"] not in ignore_types]
    if related_component:
        found = [c for c in found if related_component in c["metadata"].get("compatible_components", [])]
    if component_parent:
        found = [c for c in found if c["parent"] == component_parent]
    if has_related_of_type:
        found = [c for c in found if any(other["type"] == has_related_of_type and c["name"] in
                                         other["metadata"].get("compatible_components", []) for other in everything)]
    return found


@router.get("/api/v1/component/{name}/download")
async def download_status(name: str, backend: BackendDep) -> dict[str, bool]:
    """Nothing to download: the served model is loaded on this server."""
    await get_component(name, backend)
    return {"downloaded": True, "requires_download": False}


@router.post("/api/v1/component/downloads/required")
async def required_downloads() -> list:
    return []


@router.get("/api/v1/component/{name}/")
@router.get("/api/v1/component/{name}", include_in_schema=False)
async def get_component(name: str, backend: BackendDep) -> dict[str, Any]:
    for component in await components(backend):
        if component["name"] == name:
            return component
    raise ApiError(404, f"Component {name} does not exist.", param="name")


def _empty_section() -> list:
    return []


for _section in EMPTY_SECTIONS:
    router.add_api_route(f"/api/v1/{_section}/", _empty_section, methods=["GET"],
                         summary=f"DashAI's {_section} section: not served here, always empty")
    router.add_api_route(f"/api/v1/{_section}", _empty_section, methods=["GET"], include_in_schema=False)
