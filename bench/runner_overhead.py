"""Micro-benchmark: what DiffusionRunner.generate costs over calling the bare pipeline.

Both paths run the same loaded pipeline on the same prompts, sizes, steps and
per-image seeded generators; rounds alternate between them so that drift in
the machine's speed hits both alike. Prints images/s (median of the rounds)
and the runner's overhead at each batch size.

    python bench/runner_overhead.py [--model DIR] [--size 64] [--steps 4] [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from t2i_task.config.settings import load_settings
from t2i_task.generation.runner import DiffusionRunner, GenerationRequest


def main() -> None:
    settings = load_settings()
    parser = argparse.ArgumentParser(description="DiffusionRunner.generate versus the bare diffusers pipeline")
    parser.add_argument("--model", default=settings.default_model.path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    runner = DiffusionRunner(args.model, settings.runtime)
    pipeline, device = runner.pipeline, runner.placement.device
    print(f"{date.today()} | {platform.node()} | {platform.processor() or platform.machine()} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | {device}, {runner.placement.dtype}, "
          f"{runner.placement.attention} | {args.size}x{args.size}, {args.steps} steps, {args.rounds} rounds")

    def bare(batch: int) -> None:
        pipeline(
            prompt=[f"a red circle {i}" for i in range(batch)],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=args.size,
            height=args.size,
            generator=[torch.Generator(device).manual_seed(i) for i in range(batch)],
            output_type="pil",
        )

    def served(batch: int) -> None:
        runner.generate([
            GenerationRequest(prompt=f"a red circle {i}", num_inference_steps=args.steps, guidance_scale=args.guidance,
                              width=args.size, height=args.size, seed=i)
            for i in range(batch)
        ])

    print(f"{'batch':>5} | {'bare images/s':>13} | {'runner images/s':>15} | {'runner overhead':>15}")
    for batch in args.batches:
        timings: dict[str, list[float]] = {"bare": [], "runner": []}
        for _ in range(2):  # warm-up: allocator and kernel caches
            bare(batch), served(batch)
        for _ in range(args.rounds):
            for name, call in (("bare", bare), ("runner", served)):
                started = time.perf_counter()
                with torch.inference_mode():
                    call(batch)
                timings[name].append(time.perf_counter() - started)
        bare_rate = batch / statistics.median(timings["bare"])
        runner_rate = batch / statistics.median(timings["runner"])
        print(f"{batch:>5} | {bare_rate:>13.2f} | {runner_rate:>15.2f} | {100 * (bare_rate / runner_rate - 1):>14.1f}%")


if __name__ == "__main__":
    main()
