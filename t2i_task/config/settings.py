"""The server's configuration: one YAML file, validated once at start.

`configuration.yaml` beside the project is the default; `T2I_CONFIG` names
another file. `T2I_DATABASE_URL`, `T2I_IMAGES_DIR`, `T2I_API_KEYS` (comma
separated), `T2I_INSTANCE_NAME`, `T2I_CORS_ORIGINS`, `T2I_RETENTION` and
`T2I_MIN_FREE_MB` override their keys (ENV_OVERRIDES), so that replicas and
tests can point at their own database and folder, and secrets stay out of the
file. Relative paths are resolved against the file's folder, so the
server behaves the same whatever directory it is started from.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, PrivateAttr, SecretStr, ValidationError, model_validator

from t2i_task.config.cost import HEADROOM
from t2i_task.config.models import ModelConfig, ServedModel
from t2i_task.config.parameters import GenerationParameters, LimitsConfig, Section

OBJECT_STORAGE = "s3://"

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # t2i_task/config/settings.py -> the project
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configuration.yaml"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has a bad key or value."""


class RuntimeConfig(Section):
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
    max_loaded_models: int | None = Field(
        default=None, ge=1, description="Most models loaded at once; the least recently used idle one is unloaded "
        "to load another (never the default). Default: no limit.")
    memory_budget_mb: float | None = Field(
        default=None, gt=0, description="Most megabytes of model weights loaded at once, on their device; as "
        "max_loaded_models. Default: no limit.")


class BatchingConfig(Section):
    max_batch_size: int = Field(default=8, gt=1, description="Most requests BentoML's adaptive batcher joins into one call.")
    max_latency_ms: int = Field(default=120_000, ge=1, description="Queue latency beyond which the batcher refuses work (503).")
    calls_in_flight: int = Field(
        default=1, ge=1, le=2, description="Calls the API sends the model at once: 2 queues the next batch behind the "
        "running one (BentoML's dispatcher then polls every millisecond; t2i_task/jobs/model_calls.py)."
    )


class ServingConfig(Section):
    max_concurrency: int = Field(default=128, ge=1, description="HTTP requests in flight, all routes; beyond: 429.")
    max_queued_generations: int = Field(
        default=64, ge=1, description="Generations admitted and not ended (DashAI processes and OpenAI calls); beyond: 429."
    )
    request_timeout_s: float = Field(default=600, gt=0, description="Longest an HTTP request or a runner call may take (504 after).")
    max_body_bytes: int = Field(default=65_536, ge=1024, description="Largest request body; beyond: 413.")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys, as name:key or bare (named by a short hash), each a user; "
        "when any key is set every route but the probes and the pages needs one (T2I_API_KEYS, comma separated)."
    )
    api_keys_file: Path | None = Field(
        default=None, description="YAML of keys by name, SHA-256 and role (user or admin), read again when it "
        "changes: keys added or revoked without a restart (T2I_API_KEYS_FILE; t2i_task/config/keys.py).")
    image_links_s: float = Field(
        default=3600, gt=0, le=7 * 86400, description="How long a signed image link loads without a key: the links "
        "handed out while keys are on (OpenAI's url) carry a signature and this expiry (t2i_task/api/links.py).")
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^/?#]+(/[^?#]*)?$", description="The absolute base of the links the "
        "server hands out when it sits behind a proxy, e.g. https://images.example.org (T2I_PUBLIC_URL); "
        "default: the address each request came to.")
    url_secret: SecretStr | None = Field(
        default=None, description="The secret that signs image links (T2I_URL_SECRET); default: one made at random "
        "once and kept in the database, so that every replica signs alike and links survive restarts.")
    max_queued_per_key: int | None = Field(
        default=None, ge=1, description="Generations one API key may have queued or running at once, on every "
        "replica (a batch's lines aside); beyond: 429 with Retry-After for that key only. Default: no cap but "
        "max_queued_generations; keys take turns at the model either way.")
    unnamed_rows_owner: str | None = Field(
        default=None, description="The key name that owns the rows made with no keys configured (and before keys "
        "had names); none: only admin keys see them.")
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
    lease_s: float = Field(
        default=30, gt=0, le=3600, description="How long a replica holds queued or running work without renewing "
        "its lease (it renews every lease_s/3 at most); once expired, any replica takes the work (T2I_LEASE_S).")
    drain_timeout_s: float = Field(default=30, ge=0, description="On SIGTERM, how long running generations may finish.")
    model_load_wait_s: float = Field(
        default=10, ge=0, description="Longest a live request waits for its model to load; beyond: 503 with "
        "Retry-After, and the load goes on. Queued processes wait for it.")
    dashai_front_end: bool = Field(
        default=True,
        description="Serve DashAI's own web front end at /app/ when the dashai package is installed "
        "(t2i_task/api/dashai_front_end.py).",
    )


class BulkConfig(Section):
    """Bulk jobs (OpenAI's Batch API): their files, and how their lines yield to other work."""

    max_file_mb: float = Field(default=100, gt=0, description="Largest file POST /v1/files takes (that route "
                               "alone; every other route keeps serving.max_body_bytes); beyond: 413.")
    max_lines: int = Field(default=50_000, ge=1, description="Most lines (requests) in one batch; beyond: 400.")
    hold_after_live_ms: float = Field(
        default=500, ge=0, description="Bulk lines wait this long after live or queued work leaves the model, so "
        "that a client who just got its answer finds the model free for its next request.")
    alone_after_live_s: float = Field(
        default=10, ge=0, description="While live or queued work used the model this recently, bulk lines go one "
        "per call (a live request then waits for one line at most); after, in full batches.")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)


DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
SECONDS_IN = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _duration_s(value: Any) -> Any:
    """"30d", "12h", "15m", "10s" as seconds; a number is seconds already."""
    if isinstance(value, str):
        match = DURATION.match(value)
        if not match:
            raise ValueError(f"a duration like 30d, 12h, 15m or 10s, not {value!r}")
        return float(match[1]) * SECONDS_IN[match[2]]
    return value


class StorageConfig(Section):
    database_url: str = Field(min_length=1, description="Any SQLAlchemy URL; SQLite by default, PostgreSQL for many replicas.")
    images_dir: str = Field(min_length=1, description="A local folder, or an S3-compatible bucket and prefix "
                            "(s3://bucket/prefix; endpoint and credentials from the standard AWS environment variables).")
    retention: Annotated[float | None, BeforeValidator(_duration_s)] = Field(
        default=None, gt=0, description="Delete ended processes (with their images) older than this, e.g. 30d, "
        "12h, 10s (T2I_RETENTION); sessions stay. Null: keep everything.")
    min_free_mb: float = Field(
        default=200, ge=0, description="Below this much free space on a local disk this server writes to (the "
        "SQLite database's, the images', temporary files'), new generations are refused with 507 (T2I_MIN_FREE_MB).")
    signed_image_links_s: float | None = Field(
        default=None, gt=0, description="On object storage, answer an image's route with a redirect to a pre-signed "
        "link valid this many seconds instead of streaming it through the server (null: stream).")


class Settings(Section):
    """The whole file. The models are a registry (`models:`, a list, with `default_model` naming the
    default, else the first) or, as in files written before the registry, one `model:` section: a
    registry of one."""

    model: ModelConfig | None = None
    models: list[ModelConfig] = Field(default_factory=list)
    default_model_name: str | None = Field(default=None, alias="default_model")
    runtime: RuntimeConfig = RuntimeConfig()
    batching: BatchingConfig = BatchingConfig()
    serving: ServingConfig = ServingConfig()
    bulk: BulkConfig = BulkConfig()
    limits: LimitsConfig = LimitsConfig()
    storage: StorageConfig
    defaults: GenerationParameters = GenerationParameters()
    _served: dict[str, ServedModel] = PrivateAttr(default_factory=dict)
    _names: dict[str, str] = PrivateAttr(default_factory=dict)  # every id and alias -> its model's id

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.batching.max_latency_ms / 1000 >= self.serving.request_timeout_s:
            # Otherwise a request the batcher still accepts times out while queued.
            raise ValueError("batching.max_latency_ms must be below serving.request_timeout_s")
        if self.model is not None and self.models:
            raise ValueError("give either `model` (one model) or `models` (a registry), not both")
        entries = [self.model] if self.model is not None else self.models
        if not entries:
            raise ValueError("no model: give `model` (one model) or `models` (a registry)")
        for entry in entries:
            for name in (entry.name, *entry.aliases):
                if name in self._names:
                    raise ValueError(f"the model name {name!r} is used twice")
                self._names[name] = entry.name
            self._served[entry.name] = ServedModel.resolve(entry, self.limits, self.defaults, self.model_call_budget_s)
        if self.default_model_name is not None and self.default_model_name not in self._served:
            raise ValueError(f"default_model {self.default_model_name!r} is not one of the models: "
                             f"{', '.join(self._served)}")
        return self

    @property
    def model_call_budget_s(self) -> float:
        """Seconds of estimated work a model call may hold: it must finish within the request
        timeout, and wait in the batcher's queue less than its latency limit (or be refused)."""
        return min(self.serving.request_timeout_s, self.batching.max_latency_ms / 1000) * HEADROOM

    @property
    def served_models(self) -> list[ServedModel]:
        """Every model of the registry, the default first."""
        default = self.default_model
        return [default, *(model for model in self._served.values() if model is not default)]

    @property
    def default_model(self) -> ServedModel:
        return self._served[self.default_model_name or next(iter(self._served))]

    def served_model(self, name: str | None) -> ServedModel:
        """The model with this id or alias (None: the default); UnknownModel naming the served ones."""
        if name is None:
            return self.default_model
        try:
            return self._served[self._names[name]]
        except KeyError:
            raise UnknownModel(name, list(self._served)) from None


class UnknownModel(LookupError):
    """A model name the registry does not have."""

    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(f"Model {name} is not registered. Served: {', '.join(served)}.")
        self.name, self.served = name, served


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
    ("serving", "api_keys_file", "T2I_API_KEYS_FILE", str),
    ("serving", "public_url", "T2I_PUBLIC_URL", str),
    ("serving", "url_secret", "T2I_URL_SECRET", str),
    ("serving", "instance_name", "T2I_INSTANCE_NAME", str),
    ("serving", "cors_origins", "T2I_CORS_ORIGINS", _comma_list),
    ("serving", "lease_s", "T2I_LEASE_S", float),
    ("storage", "retention", "T2I_RETENTION", str),
    ("storage", "min_free_mb", "T2I_MIN_FREE_MB", float),
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

    _resolve_paths(raw, path.parent)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration {path}: {problems}") from exc


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths in `raw` made relative to the file's folder `base`, in place, before validation
    (a value of the wrong type is left for validation to name)."""
    entries = [raw.get("model")] + (raw.get("models") if isinstance(raw.get("models"), list) else [])
    for entry in entries:
        model_path = entry.get("path") if isinstance(entry, dict) else None
        # A local folder (./x, /x, ~/x, or one that exists here); else a Hugging Face id in the local cache.
        if isinstance(model_path, str) and (model_path.startswith((".", "/", "~")) or (base / model_path).exists()):
            entry["path"] = str(_resolve(model_path, base))
        if isinstance(entry, dict) and isinstance(entry.get("loras_dir"), str):
            entry["loras_dir"] = str(_resolve(entry["loras_dir"], base))
    serving = raw.get("serving")
    if isinstance(serving, dict) and isinstance(serving.get("api_keys_file"), str):
        serving["api_keys_file"] = str(_resolve(serving["api_keys_file"], base))
    storage = raw.get("storage")
    if isinstance(storage, dict):
        if isinstance(storage.get("database_url"), str):
            storage["database_url"] = _resolve_sqlite_url(storage["database_url"], base)
        if isinstance(storage.get("images_dir"), str) and not storage["images_dir"].startswith(OBJECT_STORAGE):
            storage["images_dir"] = str(_resolve(storage["images_dir"], base))
