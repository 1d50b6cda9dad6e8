"""The model service as the process queue uses it: what `service.py`'s DiffusionClient provides."""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from t2i_task.generation.runner import GenerationRequest, GenerationResult
from t2i_task.storage.tables import Priority


class Model(Protocol):
    """The model service as the queue uses it."""

    async def generate(self, request: GenerationRequest, priority: int = Priority.QUEUED,
                       owner: str = "") -> GenerationResult:
        """One request through the batcher (lower priorities first, owners taking turns), which calls
        `ProcessQueue.calls_sent` as the call carrying it goes; ModelUnavailable if the service is gone."""

    async def cancel(self, jobs: list[int]) -> None:
        """Tell the running call these jobs are cancelled (it stops if nothing else in it is wanted)."""

    async def progress(self) -> dict[int, tuple[int, int, int]]:
        """(steps done, steps in all, partial images decoded) of each job in the running call."""

    async def previews(self, job: int, since: int, size: tuple[int, int]) -> list[Image.Image]:
        """A running job's partial images from the `since`-th on."""

    async def load(self, name: str) -> str:
        """Load a model of the registry if it is not loaded: "loaded", "loading" or "failed: <why>"."""

    async def loaded(self) -> dict[str, int]:
        """The models loaded now, with their weights' bytes."""

    async def adapters(self) -> dict[str, dict[str, str]]:
        """Each model's LoRA adapters and their status ("ok", "not checked yet", or why one is unavailable)."""
