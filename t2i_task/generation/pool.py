"""The registry's models loaded in the model service's process, within a budget.

The default model loads first and is never unloaded; a model marked `preload`
loads at start, any other on first use. Loading runs in a thread of its own, so
calls to the models already loaded go on meanwhile. Before a model loads, the
least recently used idle model is unloaded while `runtime.max_loaded_models`
or `runtime.memory_budget_mb` would be exceeded; a model's size is read from
its safetensors headers before it loads (at the dtype it will have) and
measured from its weights once loaded.
"""

from __future__ import annotations

import gc
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i_task.config.models import ServedModel
from t2i_task.config.settings import RuntimeConfig
from t2i_task.generation.runner import DiffusionRunner, resolve_placement

log = logging.getLogger(__name__)

MEGABYTE = 2**20
# Bytes per element of the dtypes safetensors files store, by their header's name.
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class Loaded:
    runner: DiffusionRunner
    bytes: int  # its weights (parameters and buffers) on their device
    used: float  # time.monotonic() of its last call: the least recently used idle model goes first


def weights_bytes(runner: DiffusionRunner) -> int:
    """What a loaded pipeline's weights (parameters and buffers of every torch module in it) take."""
    total = 0
    for component in runner.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*component.parameters(), *component.buffers()))
    return total


def estimated_bytes(path: str, dtype: torch.dtype) -> int | None:
    """What a model's weights will take once loaded at `dtype`, from its safetensors headers alone
    (elements of floating-point tensors at the runtime dtype); None where the folder is not local."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for file in folder.glob("*/*.safetensors"):
        with file.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for side in tensor["shape"]:
                count *= side
            float_kind = tensor["dtype"].startswith(("F", "BF"))
            total += count * (itemsize if float_kind else STORED_BYTES.get(tensor["dtype"], 4))
    return total


class ModelPool:
    def __init__(self, models: Iterable[ServedModel], runtime: RuntimeConfig, *,
                 load: Callable[[ServedModel], DiffusionRunner] | None = None) -> None:
        """`models`: the registry, the default first (loaded now, before this returns)."""
        self.models = {model.name: model for model in models}
        self.default = next(iter(self.models))
        self.runtime = runtime
        self.max_loaded = runtime.max_loaded_models
        self.budget_bytes = runtime.memory_budget_mb * MEGABYTE if runtime.memory_budget_mb else None
        self._load = load or (lambda model: DiffusionRunner(
            model.path, runtime, scheduler=model.entry.scheduler, local_files_only=model.entry.local_files_only,
            loras_dir=model.entry.loras_dir))
        self._loaded: dict[str, Loaded] = {}
        self._loading: dict[str, threading.Thread] = {}
        self._failed: dict[str, str] = {}  # why a model's last load failed
        self._in_use: dict[str, int] = {}  # calls running on each model now: never unloaded meanwhile
        self._lock = threading.Lock()
        self._dtype = resolve_placement(runtime).dtype
        self._load_now(self.models[self.default])

    # What is loaded

    def loaded(self) -> dict[str, int]:
        """Each loaded model's weights in bytes."""
        with self._lock:
            return {name: loaded.bytes for name, loaded in self._loaded.items()}

    def state(self, name: str) -> str:
        """'loaded', 'loading', or 'unloaded' (its last load failed: 'failed: <why>')."""
        with self._lock:
            if name in self._loaded:
                return "loaded"
            if name in self._loading:
                return "loading"
            return f"failed: {self._failed[name]}" if name in self._failed else "unloaded"

    def loaded_runners(self) -> dict[str, DiffusionRunner]:
        with self._lock:
            return {name: loaded.runner for name, loaded in self._loaded.items()}

    def runners(self) -> list[DiffusionRunner]:
        with self._lock:
            return [loaded.runner for loaded in self._loaded.values()]

    # Loading

    def start_loading(self, name: str) -> str:
        """Load a model in the background if it is not loaded or loading; its state now."""
        model = self.models[name]  # KeyError: not in the registry
        with self._lock:
            if name not in self._loaded and name not in self._loading:
                self._failed.pop(name, None)
                thread = threading.Thread(target=self._load_in_background, args=(model,), name=f"load-{name}",
                                          daemon=True)
                self._loading[name] = thread
                thread.start()
        return self.state(name)

    def _load_in_background(self, model: ServedModel) -> None:
        try:
            self._load_now(model)
        except Exception as exc:  # a broken folder, out of memory: the requests for it say why
            log.exception("loading %s failed", model.name)
            with self._lock:
                self._failed[model.name] = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._loading.pop(model.name, None)

    def _load_now(self, model: ServedModel) -> None:
        estimate = estimated_bytes(model.path, self._dtype)
        self._make_room(model.name, estimate or 0)
        started = time.monotonic()
        runner = self._load(model)
        size = weights_bytes(runner)
        with self._lock:
            self._loaded[model.name] = Loaded(runner, size, time.monotonic())
        log.info("model %s loaded in %.1fs: %.0f MB of weights (%d loaded)", model.name, time.monotonic() - started,
                 size / MEGABYTE, len(self._loaded))
        self._make_room(None, 0)  # the estimate may have been short

    def _make_room(self, coming: str | None, coming_bytes: int) -> None:
        """Unload least recently used idle models (never the default, nor `coming`) while the loaded
        ones and `coming` would exceed the count or the memory budget."""
        while True:
            with self._lock:
                count = len(self._loaded) + (coming is not None and coming not in self._loaded)
                total = sum(loaded.bytes for loaded in self._loaded.values()) + coming_bytes
                over = (self.max_loaded is not None and count > self.max_loaded) or (
                    self.budget_bytes is not None and total > self.budget_bytes)
                idle = [(loaded.used, name) for name, loaded in self._loaded.items()
                        if name not in (self.default, coming) and not self._in_use.get(name)]
                if not over or not idle:
                    if over:
                        log.warning("over the model budget (%d loaded, %.0f MB) with nothing idle to unload",
                                    count, total / MEGABYTE)
                    return
                _, victim = min(idle)
                del self._loaded[victim]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("model %s unloaded (least recently used) to make room", victim)

    # Calls

    def runner_for_call(self, name: str) -> DiffusionRunner:
        """The runner of `name`, held in use until `release(name)`: loaded here and now if it is not
        (a call that raced an unload, say), which is slower but right."""
        with self._lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1
            loaded = self._loaded.get(name)
            if loaded is not None:
                loaded.used = time.monotonic()
                return loaded.runner
        try:
            loading = self._loading.get(name)
            if loading is not None:
                loading.join()
            if name not in self._loaded:
                self._load_now(self.models[name])
            with self._lock:
                self._loaded[name].used = time.monotonic()
                return self._loaded[name].runner
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        with self._lock:
            self._in_use[name] -= 1
