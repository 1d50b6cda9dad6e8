"""What a request's parameters are checked against: their fields, bounds and defaults.

`GenerationParameters` is a generation's parameters with the bounds DashAI
documents; `parameters_model(limits, defaults)` is the same model with a served
model's limits as field bounds and its defaults as defaults: the one model that
validates a request, and whose JSON schema clients build their forms from.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator


class Section(BaseModel):
    """A configuration section: a misspelt key is an error that names it, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(Section):
    # Sizes a client may ask for; what the model draws is `model.sizes`' business.
    min_size: int = Field(default=64, ge=8)
    max_width: int = Field(default=2048, ge=8)
    max_height: int = Field(default=2048, ge=8)
    max_steps: int = Field(default=100, ge=1)
    max_guidance_scale: float = Field(default=30.0, ge=0)
    max_images_per_request: int = Field(default=4, ge=1)
    max_prompt_length: int = Field(default=1000, ge=1, description="Characters, for the prompt and the negative prompt.")



def _no_nul(text: str) -> str:
    # PostgreSQL cannot store NUL in text, and no tokenizer or PNG chunk wants it.
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


# A string that can be stored and written anywhere: no NUL character.
CleanText = Annotated[str, AfterValidator(_no_nul)]

# LoRA adapters as DashAI's forms can edit them: one text, "name:scale, other:scale" (scale 1 if left out).
LORA_ITEM = re.compile(r"\s*([A-Za-z0-9_-]{1,64})\s*(?::\s*([-+]?\d+(?:\.\d+)?))?\s*")
MAX_LORA_SCALE = 2.0  # A1111's and ComfyUI's sliders go this far either way
MAX_LORAS = 4


def lora_list(text: str | None) -> tuple[tuple[str, float], ...]:
    """The (name, scale) pairs of a `loras` text; ValueError naming what is wrong."""
    if text is None or not text.strip():
        return ()
    pairs: list[tuple[str, float]] = []
    for part in text.split(","):
        match = LORA_ITEM.fullmatch(part)
        if not match:
            raise ValueError(f"{part.strip()!r} is not an adapter's name or name:scale (e.g. ring:0.8)")
        name, scale = match[1], float(match[2]) if match[2] else 1.0
        if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise ValueError(f"the scale of {name} must be between {-MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}")
        if name in (known for known, _ in pairs):
            raise ValueError(f"{name} is named twice")
        pairs.append((name, scale))
    if len(pairs) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} adapters at once, got {len(pairs)}")
    return tuple(pairs)


def lora_text(pairs) -> str | None:
    """`loras` as stored: "name:scale, ..." in the order given (None for none)."""
    return ", ".join(f"{name}:{scale:g}" for name, scale in pairs) or None


class GenerationParameters(Section):
    """The parameters of a generation: a session's `parameters` and the defaults.

    Field bounds are the model-independent ones DashAI documents; the served
    model's own bounds and defaults are those of `parameters_model(...)`.
    """

    num_inference_steps: int = Field(default=25, ge=1, description="Denoising steps: more is slower and finer.")
    guidance_scale: float = Field(default=7.5, ge=0, allow_inf_nan=False,
                                  description="How closely the image follows the prompt (0: ignore it).")
    negative_prompt: CleanText | None = Field(default=None, description="What the image should not show (empty: nothing).")
    width: int = Field(default=512, ge=8, multiple_of=8, description="Image width in pixels, a multiple of 8.")
    height: int = Field(default=512, ge=8, multiple_of=8, description="Image height in pixels, a multiple of 8.")
    seed: int = Field(default=-1, ge=-1, le=2**63 - 1, description="-1 draws a random seed, returned with the image.")
    num_images_per_prompt: int = Field(default=1, ge=1, description="Images made for the prompt.")
    loras: str | None = Field(default=None, description=(
        f"LoRA adapters of the model, as name:scale separated by commas (e.g. ring:0.8; scale 1 if left out, "
        f"-{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}; at most {MAX_LORAS}); empty: none."))

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_as_stored(cls, value: Any) -> Any:
        if isinstance(value, str):
            return lora_text(lora_list(value))  # ValueError: a 422 naming the field
        return value

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _blank_means_none(cls, value: Any) -> Any:
        # Stored as null: DashAI's forms send "" (or the form's blank) for an empty box, and its
        # parameter panel shows a stored "" as a required field left empty (in red).
        return None if isinstance(value, str) and not value.strip() else value


@functools.lru_cache
def parameters_model(limits: LimitsConfig, defaults: GenerationParameters, cost_note: str = "") -> type[GenerationParameters]:
    """GenerationParameters with the configured limits as field bounds and the configured
    defaults as defaults: the one model that validates a served model's parameters, and
    whose JSON schema clients build their forms from. `cost_note` is added to the
    descriptions of the fields the cost limit bounds together."""
    base = GenerationParameters.model_fields
    costed = ("num_inference_steps", "width", "height", "num_images_per_prompt")

    def bounded(name: str, **bounds):
        info = base[name]
        description = f"{info.description} {cost_note}" if cost_note and name in costed else info.description
        return info.annotation, Field(default=getattr(defaults, name), description=description, **bounds)

    return create_model(
        "ServedGenerationParameters",
        __base__=GenerationParameters,
        num_inference_steps=bounded("num_inference_steps", ge=1, le=limits.max_steps),
        guidance_scale=bounded("guidance_scale", ge=0, le=limits.max_guidance_scale, allow_inf_nan=False),
        negative_prompt=bounded("negative_prompt", max_length=limits.max_prompt_length),
        width=bounded("width", ge=limits.min_size, le=limits.max_width, multiple_of=8),
        height=bounded("height", ge=limits.min_size, le=limits.max_height, multiple_of=8),
        seed=bounded("seed", ge=-1, le=2**63 - 1),
        num_images_per_prompt=bounded("num_images_per_prompt", ge=1, le=limits.max_images_per_request),
    )


class ParameterError(ValueError):
    """A generation parameter out of its bounds or of the wrong type; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def out_of_bounds(model: type[BaseModel], exc: ValidationError) -> ParameterError:
    """The first error as a sentence naming the field, with its bounds where it has them."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "parameters"
    if error["type"] in ("greater_than_equal", "less_than_equal") and field in model.model_fields:
        schema = model.model_json_schema()["properties"][field]
        return ParameterError(field, f"{field} must be between {schema['minimum']:g} and {schema['maximum']:g}, "
                                     f"got {error['input']}")
    if error["type"] in ("string_too_long", "too_long"):
        return ParameterError(field, f"{field} is longer than {error['ctx']['max_length']} characters")
    return ParameterError(field, f"{field}: {error['msg']}")
