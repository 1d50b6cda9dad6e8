"""The server's configuration: one YAML file, validated once at start.

`configuration.yaml` beside the project is the default; `T2I_CONFIG` names
another file. `T2I_DATABASE_URL`, `T2I_IMAGES_DIR`, `T2I_API_KEYS` (comma
separated) and `T2I_INSTANCE_NAME` override their keys, so that replicas and
tests can point at their own database and folder, and secrets stay out of the
file. Relative paths are resolved against the file's folder, so the
server behaves the same whatever directory it is started from.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from t2i_task.config.cost import HEADROOM, GenerationCost, largest_square
from t2i_task.config.sizes import DrawnSizes

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # t2i_task/config/settings.py -> the project
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configuration.yaml"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has a bad key or value."""


class _Section(BaseModel):
    # A misspelt key is an error that names it, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
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
        description="More names OpenAI clients may call it by (OpenAI's own image model names always reach the "
        "served model).",
    )

    def drawn(self, width: int, height: int) -> tuple[int, int]:
        """The size this model draws for an asked `width` x `height`."""
        return self.sizes.drawn(width, height) if self.sizes else (width, height)


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    compile: bool | Literal["auto"] = Field(
        default=False,
        description="torch.compile the UNet (slow first call, faster after): true, false, or auto (on CUDA, "
        "falling back to the uncompiled UNet with the reason logged if compiling fails).",
    )
    cpu_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads on CPU; default: every core but one, left to the HTTP process."
    )


class BatchingConfig(_Section):
    max_batch_size: int = Field(default=8, gt=1, description="Most requests BentoML's adaptive batcher joins into one call.")
    max_latency_ms: int = Field(default=120_000, ge=1, description="Queue latency beyond which the batcher refuses work (503).")
    calls_in_flight: int = Field(
        default=1, ge=1, le=2, description="Calls the API sends the model at once: 2 queues the next batch behind the "
        "running one (BentoML's dispatcher then polls every millisecond; t2i_task/jobs/model_calls.py)."
    )


class ServingConfig(_Section):
    max_concurrency: int = Field(default=128, ge=1, description="HTTP requests in flight, all routes; beyond: 429.")
    max_queued_generations: int = Field(
        default=64, ge=1, description="Generations admitted and not ended (DashAI processes and OpenAI calls); beyond: 429."
    )
    request_timeout_s: float = Field(default=600, gt=0, description="Longest an HTTP request or a runner call may take (504 after).")
    max_body_bytes: int = Field(default=65_536, ge=1024, description="Largest request body; beyond: 413.")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys; when any is set every route but the probes needs one (T2I_API_KEYS)."
    )
    instance_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Names this server's queue in the database, so a restart re-queues its own interrupted work "
        "(T2I_INSTANCE_NAME; give each replica its own).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins whose browser pages may call this server, e.g. a DashAI front end on "
        "http://localhost:3000 (T2I_CORS_ORIGINS, comma separated; '*' for any). Default: none.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Starts of one process before an interrupted one is given up.")
    drain_timeout_s: float = Field(default=30, ge=0, description="On SIGTERM, how long running generations may finish.")
    dashai_front_end: bool = Field(
        default=True,
        description="Serve DashAI's own web front end at /app/ when the dashai package is installed "
        "(t2i_task/api/dashai_front_end.py).",
    )


class LimitsConfig(_Section):
    # Sizes a client may ask for; what the model draws is `model.sizes`' business.
    min_size: int = Field(default=64, ge=8)
    max_width: int = Field(default=2048, ge=8)
    max_height: int = Field(default=2048, ge=8)
    max_steps: int = Field(default=100, ge=1)
    max_guidance_scale: float = Field(default=30.0, ge=0)
    max_images_per_request: int = Field(default=4, ge=1)
    max_prompt_length: int = Field(default=1000, ge=1, description="Characters, for the prompt and the negative prompt.")


class StorageConfig(_Section):
    database_url: str = Field(min_length=1, description="Any SQLAlchemy URL; SQLite by default, PostgreSQL for many replicas.")
    images_dir: Path


def _no_nul(text: str) -> str:
    # PostgreSQL cannot store NUL in text, and no tokenizer or PNG chunk wants it.
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


# A string that can be stored and written anywhere: no NUL character.
CleanText = Annotated[str, AfterValidator(_no_nul)]


class GenerationParameters(_Section):
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


def _out_of_bounds(model: type[BaseModel], exc: ValidationError) -> ParameterError:
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


class Settings(_Section):
    model: ModelConfig
    runtime: RuntimeConfig = RuntimeConfig()
    batching: BatchingConfig = BatchingConfig()
    serving: ServingConfig = ServingConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig
    defaults: GenerationParameters = GenerationParameters()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.validate_parameters({})  # the defaults within the field limits and the cost limit
        if self.batching.max_latency_ms / 1000 >= self.serving.request_timeout_s:
            # Otherwise a request the batcher still accepts times out while queued.
            raise ValueError("batching.max_latency_ms must be below serving.request_timeout_s")
        return self

    @property
    def model_call_budget_s(self) -> float:
        """Seconds of estimated work a model call may hold: it must finish within the request
        timeout, and wait in the batcher's queue less than its latency limit (or be refused)."""
        return min(self.serving.request_timeout_s, self.batching.max_latency_ms / 1000) * HEADROOM

    @property
    def parameters_model(self) -> type[GenerationParameters]:
        return parameters_model(self.limits, self.defaults, self._cost_note())

    def _cost_note(self) -> str:
        cost = self.model.cost
        if cost is None:
            return ""
        steps = self.defaults.num_inference_steps
        side = self._largest_side(cost.max_pixels(steps, 1, self.model_call_budget_s))
        return (f"Size, steps and images are also bounded together: a request must finish within "
                f"{self.model_call_budget_s:g} s here, e.g. one image at {steps} steps is at most {side}x{side}.")

    def _largest_side(self, max_drawn_pixels: int) -> int:
        """The largest square a client may ask for whose drawn size has at most these pixels."""
        side = largest_square(max_drawn_pixels)
        largest = min(self.limits.max_width, self.limits.max_height)
        sizes = self.model.sizes
        if sizes is not None and side >= sizes.max:  # every asked size is drawn within the range
            return largest
        if sizes is not None and side < sizes.min:  # even the smallest drawn size is too large
            return 0
        return min(side, largest)

    def check_cost(self, params: GenerationParameters) -> None:
        """Refuse a request that could not finish within a model call's time, naming what would."""
        cost, budget = self.model.cost, self.model_call_budget_s
        if cost is None:
            return
        width, height = params.width, params.height
        steps, images = params.num_inference_steps, params.num_images_per_prompt
        drawn = self.model.drawn(width, height)
        estimate = cost.seconds(*drawn, steps, images)
        if estimate <= budget:
            return
        side = self._largest_side(cost.max_pixels(steps, images, budget))
        most_steps = min(cost.max_steps(*drawn, images, budget), self.limits.max_steps)
        count = f"{images} image{'s' if images > 1 else ''}"
        size_hint = (f"the largest size is {side}x{side}" if side >= self.limits.min_size
                     else "no size fits")
        steps_hint = f"the most steps is {most_steps}" if most_steps else "no step count fits"
        asked = f"{width}x{height}" + (f" (drawn at {drawn[0]}x{drawn[1]})" if drawn != (width, height) else "")
        raise ParameterError(
            "width",
            f"{asked} at {steps} steps ({count}) would take about {estimate:.0f} s on this server, "
            f"more than the {budget:g} s a generation may take: at {steps} steps and {count} {size_hint}; "
            f"at {width}x{height} and {count} {steps_hint}.",
        )

    def validate_parameters(self, parameters: dict | None) -> GenerationParameters:
        """Parameters over the configured defaults, within the configured limits.

        Raises ParameterError naming the first bad parameter (`width must be between 32 and 512, got 600`),
        or, for a request too costly to finish in time, the largest size and step count that would.
        """
        model = self.parameters_model
        try:
            params = model.model_validate(self.defaults.model_dump() | dict(parameters or {}))
        except ValidationError as exc:
            raise _out_of_bounds(model, exc) from None
        self.check_cost(params)
        return params


def _resolve(path: str | Path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _resolve_sqlite_url(url: str, base: Path) -> str:
    # sqlite:///relative.db is relative to the config file, like every other path here.
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(_resolve(url[len(prefix):], base))
    return url


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


# (section, key, variable, parser): deployments set these without copying the file.
ENV_OVERRIDES = (
    ("storage", "database_url", "T2I_DATABASE_URL", str),
    ("storage", "images_dir", "T2I_IMAGES_DIR", str),
    ("serving", "api_keys", "T2I_API_KEYS", _comma_list),
    ("serving", "instance_name", "T2I_INSTANCE_NAME", str),
    ("serving", "cors_origins", "T2I_CORS_ORIGINS", _comma_list),
)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read, resolve and validate the configuration (see the module docstring)."""
    path = Path(path or os.environ.get("T2I_CONFIG") or DEFAULT_CONFIG_PATH).resolve()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration {path} must be a mapping of sections")

    for section, key, env, parse in ENV_OVERRIDES:
        if os.environ.get(env):
            raw[section] = {**(raw.get(section) or {}), key: parse(os.environ[env])}

    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration {path}: {problems}") from exc

    base = path.parent
    model_path = settings.model.path
    if model_path.startswith((".", "/", "~")) or (base / model_path).exists():
        model_path = str(_resolve(model_path, base))
    return settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"path": model_path}),
            "storage": StorageConfig(
                database_url=_resolve_sqlite_url(settings.storage.database_url, base),
                images_dir=_resolve(settings.storage.images_dir, base),
            ),
        }
    )
