"""A model's LoRA adapters: the safetensors files of its `loras_dir`, loaded into its pipeline.

Each file `<name>.safetensors` is an adapter called `name`, in any format diffusers'
`load_lora_weights` reads (diffusers/PEFT keys, kohya-style keys). A file is checked by loading
it, when first seen and whenever it changes (its size or modification time): one that does not
load (not safetensors, made for another architecture) is listed as unavailable with the reason,
logged by name, and never stops the model or another adapter. Files added to the folder are
offered without a restart; removed ones are unloaded.

Which adapters a call uses is set just before it runs (`apply`, under the runner's lock): a
call's requests share one adapter set (GenerationRequest.batch_key), so no request ever gets
another's weights; a call without adapters runs with every adapter disabled, as the base model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a file's stem: its name in requests
OK = "ok"
NOT_CHECKED = "not checked yet"


class Adapters:
    def __init__(self, pipeline, folder: str | Path | None) -> None:
        self.pipeline = pipeline
        self.folder = Path(folder) if folder else None
        self.status: dict[str, str] = {}  # each adapter's "ok", or why it is unavailable
        self._stamps: dict[str, tuple[int, int]] = {}  # (mtime ns, size) of each file when checked
        self._loaded: set[str] = set()  # adapters loaded into the pipeline
        self._active: tuple[tuple[str, float], ...] | None = ()

    def scan(self) -> dict[str, str]:
        """Check files new or changed since the last scan and unload removed ones; each adapter's status."""
        files = {}
        if self.folder is not None and self.folder.is_dir():
            files = {path.stem: path for path in sorted(self.folder.glob("*.safetensors")) if path.is_file()}
        for name in [name for name in self._stamps if name not in files]:
            self._unload(name)
            self._stamps.pop(name)
            self.status.pop(name, None)
            log.info("adapter %s: its file was removed; unloaded", name)
        for name, path in files.items():
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._stamps.get(name) == stamp:
                continue
            self._stamps[name] = stamp
            self._unload(name)
            self.status[name] = self._load(name, path)
        return dict(self.status)

    def seen(self) -> dict[str, str]:
        """The status of each file in the folder now, without loading any: one new or changed since the
        last scan is "ok" if it was, else "not checked yet" (the next scan or call checks it)."""
        status = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.glob("*.safetensors")):
                known = self.status.get(path.stem)
                status[path.stem] = known if known is not None else NOT_CHECKED
        return status

    def _load(self, name: str, path: Path) -> str:
        if not ADAPTER_NAME.fullmatch(name):
            reason = "unavailable: its file name must be letters, digits, - and _ (at most 64) before .safetensors"
            log.warning("adapter %s (%s): %s", name, path, reason)
            return reason
        try:
            self.pipeline.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # a broken file, or one made for another architecture: this adapter alone
            self._unload(name)
            reason = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log.warning("adapter %s (%s) does not load: %s", name, path, reason)
            return reason
        self._loaded.add(name)
        self._active = None  # loading activates it: the next call sets its own set
        log.info("adapter %s loaded from %s", name, path)
        return OK

    def _unload(self, name: str) -> None:
        if name in self._loaded or name in self._peft_adapters():
            try:
                self.pipeline.delete_adapters([name])
            except Exception as exc:  # half loaded: what remains is never activated
                log.warning("adapter %s could not be unloaded: %s", name, exc)
            self._loaded.discard(name)
            self._active = None

    def _peft_adapters(self) -> set[str]:
        try:
            return {name for names in self.pipeline.get_list_adapters().values() for name in names}
        except Exception:  # no adapter was ever loaded
            return set()

    def apply(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make the pipeline's next call use exactly these adapters at these scales (none: the base
        model). An adapter not available raises LookupError naming it."""
        wanted = tuple(loras)
        if wanted == self._active:
            return
        missing = [name for name, _ in wanted if self.status.get(name) != OK]
        if missing:
            self.scan()  # added or fixed since the last look
            missing = [name for name, _ in wanted if self.status.get(name) != OK]
        if missing:
            raise LookupError(f"adapter {missing[0]!r} is not available "
                              f"({self.status.get(missing[0], 'no such file')})")
        if not wanted:
            if self._loaded:
                self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name for name, _ in wanted], adapter_weights=[scale for _, scale in wanted])
        self._active = wanted
