"""Where a prompt becomes an image: a diffusers pipeline, loaded once and run in batches.

`DiffusionRunner` knows diffusers and torch, nothing of HTTP or SQL. It loads a
text-to-image pipeline from a local folder or the local Hugging Face cache
(safetensors only, no remote code), places it on the chosen device and dtype,
picks the attention implementation, and `generate` runs a list of requests in
as few pipeline calls as their settings allow.

Reproducibility: image `i` of a request with seed `s` is drawn from its own
`torch.Generator` seeded `s + i`, so a request gives the same image alone or
inside any batch (up to floating-point differences between batch sizes).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from t2i_task.config.settings import RuntimeConfig
from t2i_task.generation.adapters import Adapters
from t2i_task.generation.previews import MAX_PARTIAL_IMAGES, decode_latents, preview_steps

log = logging.getLogger(__name__)

RANDOM_SEED = -1
MAX_SEED = 2**63 - 1


class GenerationRequest(BaseModel):
    """One prompt and the settings to draw its images with."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    model: str = Field(default="", description="The registry's id of the model to draw with ('': the runner's own).")
    negative_prompt: str | None = None
    num_inference_steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    width: int = Field(ge=8, multiple_of=8)
    height: int = Field(ge=8, multiple_of=8)
    seed: int | None = Field(default=None, ge=RANDOM_SEED, le=MAX_SEED, description="None or -1: random.")
    num_images: int = Field(default=1, ge=1)
    job: int | None = Field(default=None, description="Who asked (a process id): what `cancel` names.")
    partial_images: int = Field(default=0, ge=0, le=MAX_PARTIAL_IMAGES,
                                description="Previews of each image to decode while it is drawn (previews.py).")
    loras: tuple[tuple[str, float], ...] = Field(default=(), description="LoRA adapters and their scales (adapters.py).")

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call: the one place that says what must be
        equal inside a call (the model service, the runner and the scheduler group by it)."""
        # "No negative prompt" is not always "" (SDXL uses zeros for it), so the two never mix.
        return (self.model, self.num_inference_steps, self.guidance_scale, self.width, self.height,
                self.negative_prompt is None, self.loras)


@dataclass
class GenerationResult:
    """A request's images, each with the seed that reproduces it."""

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None  # why this request failed, even when run alone
    previews: list[Image.Image] = field(default_factory=list)  # its partial images, each image's in step order
    prompt_tokens: int = 0  # the prompt's length in the model's tokens, as far as the model reads it


class Cancelled(RuntimeError):
    """Every job of a call was cancelled before it started."""


class RuntimeUnavailable(RuntimeError):
    """A configured device, dtype or attention choice cannot be honoured here."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    attention: str


def resolve_placement(runtime: RuntimeConfig) -> Placement:
    """Turn `auto` choices into concrete ones; refuse forced choices that cannot work."""
    cuda = torch.cuda.is_available()
    if runtime.device == "cuda" and not cuda:
        raise RuntimeUnavailable("runtime.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if runtime.device == "auto":
        device = torch.device("cuda" if cuda else "cpu")
    else:
        device = torch.device(runtime.device)

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if runtime.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = dtypes[runtime.dtype]
    if dtype is torch.float16 and device.type != "cuda":
        # It runs, but about 25x slower than float32: never what anyone wants.
        raise RuntimeUnavailable("runtime.dtype 'float16' needs CUDA; on CPU use 'float32' (or 'bfloat16')")

    attention = "sdpa"
    if runtime.attention in ("auto", "xformers"):
        problem = "it needs CUDA" if device.type != "cuda" else xformers_problem(device, dtype)
        if problem is None:
            attention = "xformers"
        elif runtime.attention == "xformers":
            raise RuntimeUnavailable(f"runtime.attention is 'xformers' but {problem}; use 'auto' or 'sdpa'")
        elif device.type == "cuda":
            log.warning("attention: PyTorch SDPA, not xformers: %s", problem)
    return Placement(device, dtype, attention)


def xformers_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why xformers cannot run here, or None once one tiny attention call through it worked.

    Being installed is not enough: a wheel built for another torch imports, warns
    that its C++/CUDA extensions cannot load, and fails at the first call.
    """
    if importlib.util.find_spec("xformers") is None:
        return "it is not installed (pip install '.[gpu]')"
    try:
        import xformers.ops

        query = torch.randn(1, 4, 2, 64, device=device, dtype=dtype)  # batch, tokens, heads, head size
        xformers.ops.memory_efficient_attention(query, query, query)
    except Exception as exc:  # ImportError, NotImplementedError, RuntimeError: all mean "not here"
        return f"a test call failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def default_cpu_threads() -> int:
    """Every core but one: the API process needs a core of its own, or torch's
    threads and it preempt each other. Measured on 2 cores at concurrency 16:
    73 served images/s with 1 torch thread against 60 with 2 (docs/benchmarks.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def load_pipeline(model_path: str, placement: Placement, scheduler: str | None = None, local_files_only: bool = True):
    """Load a diffusers text-to-image pipeline: safetensors only, never remote code."""
    import diffusers
    import transformers

    # A server's log is no place for per-file loading bars.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(
        model_path,
        dtype=placement.dtype,
        use_safetensors=True,
        local_files_only=local_files_only,
        safety_checker=None,
        requires_safety_checker=False,
    )
    if scheduler:
        scheduler_class = getattr(diffusers, scheduler, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise ValueError(f"model.scheduler {scheduler!r} is not a diffusers scheduler class")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(placement.device)


class DiffusionRunner:
    """A loaded pipeline and the one lock that serialises calls to it."""

    def __init__(
        self,
        model_path: str,
        runtime: RuntimeConfig | None = None,
        *,
        scheduler: str | None = None,
        local_files_only: bool = True,
        max_images_per_call: int | None = None,
        loras_dir: str | None = None,
    ) -> None:
        runtime = runtime or RuntimeConfig()
        self.placement = resolve_placement(runtime)
        if self.placement.device.type == "cpu":
            torch.set_num_threads(runtime.cpu_threads or default_cpu_threads())
        started = time.perf_counter()
        self.pipeline = load_pipeline(model_path, self.placement, scheduler, local_files_only)
        self._lock = threading.Lock()  # a pipeline's scheduler holds per-call state: one call at a time
        # Jobs whose images nobody wants any more; a call made only of such jobs stops at its
        # next step. Written by `cancel` from another thread while a call runs.
        self._cancelled: set[int] = set()
        # Denoising steps done and in all, per job of the running call: read by `progress`.
        self._progress: dict[int, tuple[int, int]] = {}
        # Partial images decoded so far, per job of the running call: read by `previews`.
        self._previews: dict[int, list[Image.Image]] = {}
        # Its LoRA files, checked now and whenever they change; loaded before the UNet is compiled.
        self.adapters = Adapters(self.pipeline, loras_dir)
        self.adapters.scan()
        self._optimize(runtime.compile)
        self.load_seconds = time.perf_counter() - started
        self.max_images_per_call = max_images_per_call
        log.info(
            "loaded %s on %s (%s, %s attention) in %.2fs",
            model_path, self.placement.device, self.placement.dtype, self.placement.attention, self.load_seconds,
        )

    def _optimize(self, compile_unet: bool | str) -> None:
        pipeline = self.pipeline
        if self.placement.attention == "xformers":
            pipeline.enable_xformers_memory_efficient_attention()
        if self.placement.device.type == "cuda":
            pipeline.unet.to(memory_format=torch.channels_last)
            # Both only change how large batches and large images are decoded:
            # slicing decodes one image at a time, tiling only acts above the tile size.
            pipeline.vae.enable_slicing()
            pipeline.vae.enable_tiling()
        if compile_unet is True or (compile_unet == "auto" and self.placement.device.type == "cuda"):
            self._compile_unet(forced=compile_unet is True)

    def _compile_unet(self, forced: bool) -> None:
        """torch.compile the UNet and compile it now, on one small call: torch.compile is
        lazy, and a compiler that fails must fail here, not on a user's request."""
        eager = self.pipeline.unet
        self.pipeline.unet = torch.compile(eager)
        try:
            self._call([GenerationRequest(prompt="warm-up", num_inference_steps=1, guidance_scale=1.0,
                                          width=64, height=64)], [0])
        except Exception as exc:
            self.pipeline.unet = eager
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if forced:
                raise RuntimeUnavailable(f"runtime.compile is true but compiling the UNet failed ({reason}); "
                                         "use 'auto' or false") from exc
            log.warning("running the UNet uncompiled: torch.compile failed (%s)", reason)

    def adapter_status(self) -> dict[str, str]:
        """Each adapter of the model's folder: "ok", or why it is unavailable; new or changed files are
        checked now unless a call is running (then they are "not checked yet": the next look, or a call
        that asks for one, checks them)."""
        if not self._lock.acquire(blocking=False):
            return self.adapters.seen()
        try:
            return self.adapters.scan()
        finally:
            self._lock.release()

    def cancel(self, jobs: Sequence[int]) -> None:
        """Stop the running call at its next step if every job in it is cancelled; a call that
        still has a wanted job goes on untouched, so its images stay the same."""
        self._cancelled.update(jobs)

    def progress(self) -> dict[int, tuple[int, int]]:
        """(steps done, steps in all) of each job in the running call."""
        return dict(self._progress)

    def previews(self, job: int, since: int = 0) -> list[Image.Image]:
        """The partial images of a job in the running call decoded so far, from the `since`-th on;
        they also come back in its result, whether or not anybody asked here."""
        return list(self._previews.get(job, ()))[since:]

    def _step_callback(self, requests: Sequence[GenerationRequest], total: int, previews: list[list[Image.Image]]):
        """The step-end callback: records progress, decodes the partial images asked for (into
        `previews`, one list per image of the call), and stops a call nobody wants any more."""
        jobs = frozenset(r.job for r in requests)
        known = [job for job in jobs if job is not None]
        # Which images of the call get a preview after which step.
        wanted: dict[int, list[int]] = defaultdict(list)
        for position, request in enumerate(requests):
            for step in preview_steps(total, request.partial_images):
                wanted[step].append(position)

        def on_step_end(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
            for job in known:
                self._progress[job] = (step + 1, total)
            if positions := wanted.get(step + 1):
                decoded = decode_latents(pipeline, callback_kwargs["latents"][positions])
                for position, image in zip(positions, decoded):
                    previews[position].append(image)
                    if requests[position].job is not None:
                        self._previews.setdefault(requests[position].job, []).append(image)
            if jobs <= self._cancelled:
                pipeline._interrupt = True  # diffusers skips the remaining steps
            return callback_kwargs

        return on_step_end

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Images for each request, in request order.

        Requests whose steps, guidance and size match run in one pipeline call
        (split only if `max_images_per_call` is set), so a batch of N compatible
        requests costs one denoising loop. A request that fails even when run
        alone comes back with `error` set; its neighbours are not affected.
        """
        results = [GenerationResult(prompt_tokens=self._prompt_tokens(request.prompt)) for request in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[request.batch_key()].append(index)

        for indices in groups.values():
            # One entry per image: (request index, seed).
            images = [
                (index, seed) for index in indices for seed in self._seeds(requests[index])
            ]
            chunk = self.max_images_per_call or len(images)
            for start in range(0, len(images), chunk):
                self._run_isolating_failures(requests, images[start : start + chunk], results)
        return results

    def _run_isolating_failures(
        self, requests: Sequence[GenerationRequest], part: list[tuple[int, int]], results: list[GenerationResult]
    ) -> None:
        """One pipeline call for `part`; if it fails (out of memory, say), memory is freed
        and each request in it runs alone, so one bad request does not fail the others."""
        try:
            images, previews = self._call([requests[index] for index, _ in part], [seed for _, seed in part])
        except Cancelled as exc:  # nobody wants these images: nothing to retry
            for index, _ in part:
                results[index].error = f"{type(exc).__name__}: {exc}"
            return
        except Exception as exc:
            self._free_memory()
            owners = list(dict.fromkeys(index for index, _ in part))
            if len(owners) == 1:
                results[owners[0]].error = f"{type(exc).__name__}: {exc}"
                return
            log.warning("a call of %d requests failed (%s); running them one at a time", len(owners), type(exc).__name__)
            for owner in owners:
                self._run_isolating_failures(requests, [(i, seed) for i, seed in part if i == owner], results)
            return
        for (index, seed), image, image_previews in zip(part, images, previews):
            results[index].images.append(image)
            results[index].seeds.append(seed)
            results[index].previews.extend(image_previews)

    def _prompt_tokens(self, prompt: str) -> int:
        tokenizer = getattr(self.pipeline, "tokenizer", None)
        if tokenizer is None:
            return 0
        return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)

    def _free_memory(self) -> None:
        gc.collect()
        if self.placement.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _seeds(request: GenerationRequest) -> list[int]:
        base = request.seed
        if base is None or base == RANDOM_SEED:
            base = secrets.randbelow(2**32)
        return [(base + i) % (MAX_SEED + 1) for i in range(request.num_images)]

    def _call(
        self, requests: list[GenerationRequest], seeds: list[int]
    ) -> tuple[list[Image.Image], list[list[Image.Image]]]:
        """One pipeline call: one image per (request, seed) pair, and the partial images of each."""
        generators = [torch.Generator(device=self.placement.device).manual_seed(seed) for seed in seeds]
        jobs = frozenset(r.job for r in requests)
        previews: list[list[Image.Image]] = [[] for _ in requests]
        with self._lock, torch.inference_mode():
            try:
                if jobs <= self._cancelled:  # cancelled while it waited for the pipeline
                    raise Cancelled(f"jobs {sorted(jobs)} were cancelled")
                self.adapters.apply(requests[0].loras)  # one set per call: batch_key
                images = self._pipeline_call(requests, generators, previews).images
                if getattr(self.pipeline, "_interrupt", False):  # stopped part-way: no usable image
                    raise Cancelled(f"jobs {sorted(jobs)} were cancelled")
                return images, previews
            finally:
                self._cancelled -= jobs
                for job in jobs:
                    self._progress.pop(job, None)
                    self._previews.pop(job, None)

    def _pipeline_call(self, requests: list[GenerationRequest], generators: list, previews: list[list[Image.Image]]):
        first = requests[0]
        # Only calls made for known jobs, or asked for previews, pay for a callback at each step.
        watched = any(r.job is not None or r.partial_images for r in requests)
        return self.pipeline(
            prompt=[r.prompt for r in requests],
            negative_prompt=None if first.negative_prompt is None else [r.negative_prompt for r in requests],
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            width=first.width,
            height=first.height,
            num_images_per_prompt=1,
            generator=generators,
            output_type="pil",
            callback_on_step_end=self._step_callback(requests, first.num_inference_steps, previews) if watched else None,
        )
