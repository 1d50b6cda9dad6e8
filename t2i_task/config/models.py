"""The model registry's entries: each model the server serves, with what is its own.

`ModelConfig` is one entry of `models:` in configuration.yaml (or today's single
`model:` section): where its weights are, the sizes it draws well, what a
generation costs with it, the names clients may use, and its own generation
defaults and parameter limits over the file's `defaults` and `limits`.
`ServedModel` is that entry resolved: the limits and defaults that apply, and
everything a request for it is checked against (field bounds, the cost limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field, ValidationError

from t2i_task.config.cost import GenerationCost, largest_square
from t2i_task.config.parameters import (GenerationParameters, LimitsConfig, ParameterError, Section, out_of_bounds,
                                        parameters_model)
from t2i_task.config.sizes import DrawnSizes


class ModelConfig(Section):
    name: str = Field(min_length=1, description="Id under which the model is served (OpenAI `model`, DashAI `model_name`).")
    path: str = Field(min_length=1, description="Local diffusers folder or a Hugging Face model id (loaded from the local cache).")
    scheduler: str | None = Field(default=None, description="diffusers scheduler class replacing the model's own, e.g. EulerDiscreteScheduler.")
    local_files_only: bool = Field(default=True, description="Never contact the Hub; the model must be a local folder or cached.")
    cost: GenerationCost | None = Field(
        default=None,
        description="Seconds a generation takes on this machine (`make calibrate`); without it only the field "
        "limits bound a request, and work that cannot finish in time fails by timeout.",
    )
    sizes: DrawnSizes | None = Field(
        default=None,
        description="The size it was trained at and the sides it draws well; other sizes are drawn inside that "
        "range and resized (t2i_task/config/sizes.py). Without it every size is drawn as asked.",
    )
    aliases: list[str] = Field(
        default_factory=list,
        description="More names OpenAI clients may call it by (OpenAI's own image model names reach the default "
        "model).",
    )
    loras_dir: str | None = Field(
        default=None, description="A folder of LoRA adapters for this model, one <name>.safetensors each (diffusers "
        "or kohya keys), taken per request (`loras`); checked at start and when the folder changes.")
    preload: bool = Field(default=False, description="Load at start (the default model always is); else on first use.")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Its generation defaults, over the file's `defaults` (e.g. its native size).")
    limits: dict[str, Any] = Field(
        default_factory=dict, description="Its parameter limits, over the file's `limits`.")


@dataclass(frozen=True)
class ServedModel:
    """A registry entry as the server serves it: its own defaults and limits over the file's, and
    `budget_s`, the seconds of estimated work a model call may hold (Settings.model_call_budget_s)."""

    entry: ModelConfig
    limits: LimitsConfig
    defaults: GenerationParameters
    budget_s: float

    @classmethod
    def resolve(cls, entry: ModelConfig, limits: LimitsConfig, defaults: GenerationParameters,
                budget_s: float) -> ServedModel:
        """The entry over the file's limits and defaults; ValueError naming the model and the key if they
        do not fit together (its defaults outside its limits or its cost limit, say)."""
        try:
            own_limits = LimitsConfig.model_validate(limits.model_dump() | entry.limits)
            own_defaults = GenerationParameters.model_validate(defaults.model_dump() | entry.defaults)
        except ValidationError as exc:
            problem = exc.errors()[0]
            raise ValueError(f"model {entry.name}: {'.'.join(map(str, problem['loc']))}: {problem['msg']}") from None
        served = cls(entry, own_limits, own_defaults, budget_s)
        try:
            served.validate_parameters({})  # its defaults within its field limits and its cost limit
        except ParameterError as exc:
            raise ValueError(f"model {entry.name}: its defaults do not fit its limits: {exc}") from None
        return served

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def cost(self) -> GenerationCost | None:
        return self.entry.cost

    @property
    def sizes(self) -> DrawnSizes | None:
        return self.entry.sizes

    def drawn(self, width: int, height: int) -> tuple[int, int]:
        """The size this model draws for an asked `width` x `height`."""
        return self.sizes.drawn(width, height) if self.sizes else (width, height)

    @property
    def parameters_model(self) -> type[GenerationParameters]:
        """The pydantic model of its parameters: its limits as bounds, its defaults as defaults."""
        return parameters_model(self.limits, self.defaults, self._cost_note())

    def _cost_note(self) -> str:
        if self.cost is None:
            return ""
        steps = self.defaults.num_inference_steps
        side = self._largest_side(self.cost.max_pixels(steps, 1, self.budget_s))
        return (f"Size, steps and images are also bounded together: a request must finish within "
                f"{self.budget_s:g} s here, e.g. one image at {steps} steps is at most {side}x{side}.")

    def _largest_side(self, max_drawn_pixels: int) -> int:
        """The largest square a client may ask for whose drawn size has at most these pixels."""
        side = largest_square(max_drawn_pixels)
        largest = min(self.limits.max_width, self.limits.max_height)
        if self.sizes is not None and side >= self.sizes.max:  # every asked size is drawn within the range
            return largest
        if self.sizes is not None and side < self.sizes.min:  # even the smallest drawn size is too large
            return 0
        return min(side, largest)

    def check_cost(self, params: GenerationParameters) -> None:
        """Refuse a request that could not finish within a model call's time, naming what would."""
        if self.cost is None:
            return
        width, height = params.width, params.height
        steps, images = params.num_inference_steps, params.num_images_per_prompt
        drawn = self.drawn(width, height)
        estimate = self.cost.seconds(*drawn, steps, images)
        if estimate <= self.budget_s:
            return
        side = self._largest_side(self.cost.max_pixels(steps, images, self.budget_s))
        most_steps = min(self.cost.max_steps(*drawn, images, self.budget_s), self.limits.max_steps)
        count = f"{images} image{'s' if images > 1 else ''}"
        size_hint = f"the largest size is {side}x{side}" if side >= self.limits.min_size else "no size fits"
        steps_hint = f"the most steps is {most_steps}" if most_steps else "no step count fits"
        asked = f"{width}x{height}" + (f" (drawn at {drawn[0]}x{drawn[1]})" if drawn != (width, height) else "")
        raise ParameterError(
            "width",
            f"{asked} at {steps} steps ({count}) would take about {estimate:.0f} s on this server, "
            f"more than the {self.budget_s:g} s a generation may take: at {steps} steps and {count} {size_hint}; "
            f"at {width}x{height} and {count} {steps_hint}.",
        )

    def validate_parameters(self, parameters: dict | None) -> GenerationParameters:
        """Parameters over this model's defaults, within its limits.

        Raises ParameterError naming the first bad parameter (`width must be between 32 and 512, got 600`),
        or, for a request too costly to finish in time, the largest size and step count that would.
        """
        model = self.parameters_model
        try:
            params = model.model_validate(self.defaults.model_dump() | dict(parameters or {}))
        except ValidationError as exc:
            raise out_of_bounds(model, exc) from None
        self.check_cost(params)
        return params

    def seconds(self, params: GenerationParameters) -> float:
        """Estimated seconds the model needs for these parameters (0 when it is not calibrated)."""
        if self.cost is None:
            return 0.0
        return self.cost.seconds(*self.drawn(params.width, params.height), params.num_inference_steps,
                                 params.num_images_per_prompt)
