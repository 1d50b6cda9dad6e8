"""The DashAI model: DashAI's form and `generate(prompt)`, with the work done on the server.

DashAI builds a model's form from its `SCHEMA` when it starts. This one asks
the server at T2I_SERVER_URL for its default model's limits and defaults then,
so the form offers what the server accepts; if the server cannot be reached at
that moment the form carries the limits of the server's shipped configuration
(`SHIPPED_FORM`). The server judges every request either way: a value it
refuses comes back as its own sentence naming the field.

The API key is read from T2I_API_KEY in DashAI's environment, never from the
form: DashAI stores session parameters, and their history, in plain text.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from DashAI.back.core.schema_fields import float_field, int_field, schema_field, string_field
from DashAI.back.core.schema_fields.base_schema import BaseSchema
from DashAI.back.core.utils import MultilingualString
from DashAI.back.models.text_to_image_generation_model import TextToImageGenerationTaskModel
from PIL import Image
from pydantic import Field, create_model

from dashai_t2i_server.client import InferenceServer, ServerError, configured_url

log = logging.getLogger(__name__)

# The generation parameters the server takes, with the bounds and defaults of its shipped
# configuration (configuration.yaml of t2i-task 0.1.0; a test keeps the two equal).
SHIPPED_FORM: dict[str, dict[str, Any]] = {
    "num_inference_steps": {"minimum": 1, "maximum": 50, "placeholder": 10},
    "guidance_scale": {"minimum": 0.0, "maximum": 30.0, "placeholder": 3.0},
    "negative_prompt": {"maxLength": 1000, "placeholder": ""},
    "width": {"minimum": 32, "maximum": 2048, "placeholder": 64},
    "height": {"minimum": 32, "maximum": 2048, "placeholder": 64},
    "seed": {"minimum": -1, "maximum": 2**63 - 1, "placeholder": -1},
    "num_images_per_prompt": {"minimum": 1, "maximum": 4, "placeholder": 1},
    "loras": {"placeholder": ""},
}
GENERATION_FIELDS = tuple(SHIPPED_FORM)
# How an optional text starts in DashAI's form. DashAI 0.10.0's front end marks a text box holding ""
# as "a required field" (in red) and starts each field at its placeholder, or at "" when there is
# none; DashAI stores the form's values as they are. So an optional text starts as a blank (" "),
# which means none here, and offers its null option first: given [text, null], the front end
# flattens the field into a plain text box whose validation refuses null.
BLANK = " "

DESCRIPTIONS = {
    "server_url": "Address of the t2i-task inference server that makes the images (default: T2I_SERVER_URL "
                  "in DashAI's environment). Its API key, if it has keys, comes from T2I_API_KEY there.",
    "model": "Model on the server; leave empty for the server's default model.",
    "num_inference_steps": "Denoising steps: more is slower and finer.",
    "guidance_scale": "How closely the image follows the prompt (0: ignore it).",
    "negative_prompt": "What the image should not show (empty: nothing).",
    "width": "Image width in pixels, a multiple of 8.",
    "height": "Image height in pixels, a multiple of 8.",
    "seed": "-1 draws a random seed; a fixed seed gives the same image for the same settings.",
    "num_images_per_prompt": "Images made for the prompt.",
    "loras": "LoRA adapters of the model, as name:scale separated by commas (e.g. ring:0.8; scale 1 if left out, "
             "-2 to 2); empty: none.",
}


def server_form() -> dict[str, dict[str, Any]]:
    """Bounds and defaults of the server's default model, or the shipped ones if it cannot be asked."""
    server = InferenceServer(configured_url(), os.environ.get("T2I_API_KEY"), retries=0, call_timeout_s=3)
    try:
        properties = server.model_form()["schema"]["properties"]
    except (ServerError, KeyError, TypeError, ValueError) as exc:
        log.warning("DashAI form of the inference server model: the shipped limits (%s)", exc)
        return SHIPPED_FORM
    finally:
        server.close()
    keys = ("minimum", "maximum", "maxLength", "placeholder")
    return {name: {key: properties[name][key] for key in keys if key in properties.get(name, {})} or shipped
            for name, shipped in SHIPPED_FORM.items()}


def server_models() -> dict[str, list[str]]:
    """The server's models, its default first, each with its usable LoRA adapters ({} if it cannot be asked now)."""
    server = InferenceServer(configured_url(), os.environ.get("T2I_API_KEY"), retries=0, call_timeout_s=3)
    try:
        return {model["id"]: [adapter["name"] for adapter in model.get("adapters", [])
                              if not adapter["status"].startswith("unavailable")]
                for model in server.request("GET", "/v1/models").json()["data"]}
    except (ServerError, KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("the inference server's models: unknown for now (%s)", exc)
        return {}
    finally:
        server.close()


def _field(kind, name: str, form: dict[str, Any], description: str | None = None, **bounds):
    return schema_field(kind(**bounds), placeholder=form["placeholder"], description=MultilingualString(
        en=description or DESCRIPTIONS[name]), alias=MultilingualString(en=name.replace("_", " ").capitalize()))


def build_schema(form: dict[str, dict[str, Any]], models: dict[str, list[str]] | list[str] | None = None
                 ) -> type[BaseSchema]:
    """DashAI's form for the server's parameters, with the bounds in `form`; its `model` field starts at the
    server's default model and names the others (`models`, the default first, with their adapters), as
    text; its `loras` field, a text (DashAI's form cannot edit a list), names each model's adapters."""

    def bounded(name: str, kind, **extra):
        spec = form[name]
        return _field(kind, name, spec, ge=spec.get("minimum"), le=spec.get("maximum"), **extra), ...

    def text(name: str, start: str = BLANK, description: str | None = None):
        def null_first(schema: dict[str, Any]) -> None:  # see BLANK
            schema["anyOf"].sort(key=lambda option: option.get("type") != "null")
            schema["placeholder"] = start

        field = _field(string_field, name, {"placeholder": start}, description)
        return Optional[field], Field(default=None, json_schema_extra=null_first)

    adapters = models if isinstance(models, dict) else {name: [] for name in models or []}
    models = list(adapters)
    model_help = (f"Model on the server: {', '.join(models)} ({models[0]} is its default; blank: the default)."
                  if models else DESCRIPTIONS["model"])
    offered = "; ".join(f"{model}: {', '.join(names)}" for model, names in adapters.items() if names)
    loras_help = DESCRIPTIONS["loras"] + (f" Adapters on the server: {offered}." if offered else "")

    return create_model(
        "InferenceServerSchema",
        __base__=BaseSchema,
        __doc__="A text-to-image model served by a t2i-task inference server, and its generation parameters.",
        server_url=(_field(string_field, "server_url", {"placeholder": configured_url()}), configured_url()),
        model=text("model", models[0] if models else BLANK, model_help),
        num_inference_steps=bounded("num_inference_steps", int_field),
        guidance_scale=bounded("guidance_scale", float_field),
        negative_prompt=text("negative_prompt"),
        width=bounded("width", int_field, multiple_of=8),
        height=bounded("height", int_field, multiple_of=8),
        seed=bounded("seed", int_field),
        num_images_per_prompt=bounded("num_images_per_prompt", int_field),
        loras=text("loras", description=loras_help),
    )


def blank_is_none(value: Any) -> Any:
    """An empty or blank text (the form's BLANK) means none."""
    return None if isinstance(value, str) and not value.strip() else value


class InferenceServerModel(TextToImageGenerationTaskModel):
    """Text to image on a t2i-task inference server: DashAI sends the prompt, the server makes the images."""

    SCHEMA = build_schema(server_form(), server_models())
    REQUIRES_DOWNLOAD = False  # nothing runs on DashAI's machine: it is ready as soon as it is installed
    DISPLAY_NAME = MultilingualString(
        en="Text to image on an inference server",
        es="Texto a imagen en un servidor de inferencia",
        pt="Texto para imagem em um servidor de inferência",
        de="Text zu Bild auf einem Inferenzserver",
        zh="推理服务器上的文本生成图像",
    )
    DESCRIPTION = MultilingualString(
        en="Generates images on a t2i-task inference server (T2I_SERVER_URL): the model is loaded there once, "
           "in fp16 on a GPU when it has one, and shared with other users in batches. Nothing is downloaded or "
           "run on this machine.",
        es="Genera imágenes en un servidor de inferencia t2i-task (T2I_SERVER_URL): el modelo se carga allí una "
           "vez y se comparte en lotes. En esta máquina no se descarga ni ejecuta nada.",
    )

    def __init__(self, **kwargs: Any) -> None:
        params = self.validate_and_transform(kwargs)
        self.server = InferenceServer(
            params.get("server_url") or configured_url(),
            os.environ.get("T2I_API_KEY"),
            max_wait_s=float(os.environ.get("T2I_MAX_WAIT_S") or 1800),
        )
        self.model = blank_is_none(params.get("model"))
        self.parameters = {name: value for name in GENERATION_FIELDS
                           if (value := blank_is_none(params.get(name))) is not None}

    def generate(self, input: str) -> list[Image.Image]:
        """The server's images for the prompt, in order. Raises ServerError with a sentence to show."""
        return self.server.generate(input, self.model, self.parameters)
