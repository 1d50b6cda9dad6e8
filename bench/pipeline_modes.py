"""Denoising speed of one model under each runtime mode: SDPA, xformers, torch.compile.

Meant for a GPU with Stable Diffusion 1.5's real architecture (random weights,
written locally, no download):

    python -m t2i_task.generation.tiny_model --architecture sd15 models/sd15-random
    python bench/pipeline_modes.py --model models/sd15-random --size 512 --steps 25 --batches 1 4 8

For every mode and batch size it reports UNet iterations per second (timed
between the first and the last denoising step, as diffusers' progress bar
counts them) and images per second for the whole call (text encoding,
denoising, VAE decoding). A mode that cannot run here (xformers on a CPU) is
reported as unavailable with the reason. On a CPU the same code runs at a small
size, which checks the path, not the speed.

Writes bench/pipeline_modes.json (override with --results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from t2i_task.config.settings import RuntimeConfig
from t2i_task.generation.runner import DiffusionRunner, RuntimeUnavailable
from t2i_task.local_server import PROJECT_ROOT

MODES = {
    "sdpa": RuntimeConfig(attention="sdpa"),
    "xformers": RuntimeConfig(attention="xformers"),
    "compile": RuntimeConfig(attention="sdpa", compile=True),
}


def measure(runner: DiffusionRunner, batch: int, size: int, steps: int, rounds: int) -> dict:
    pipeline, device = runner.pipeline, runner.placement.device
    step_times: list[float] = []

    def on_step_end(_pipeline, _step, _timestep, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter())
        return kwargs

    def call() -> float:
        step_times.clear()
        started = time.perf_counter()
        pipeline(prompt=["a red circle on a blue background"] * batch, num_inference_steps=steps, width=size,
                 height=size, guidance_scale=7.5, output_type="pil", callback_on_step_end=on_step_end,
                 generator=[torch.Generator(device).manual_seed(i) for i in range(batch)])
        return time.perf_counter() - started

    with torch.inference_mode():
        call()  # warm-up (and compilation, for the compile mode)
        calls, iterations = [], []
        for _ in range(rounds):
            calls.append(call())
            if len(step_times) > 1:
                iterations.append((len(step_times) - 1) / (step_times[-1] - step_times[0]))
    return {
        "batch": batch,
        "it_per_s": statistics.median(iterations) if iterations else None,
        "images_per_s": batch / statistics.median(calls),
        "seconds_per_call": statistics.median(calls),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers folder, e.g. one written with --architecture sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=PROJECT_ROOT / "bench" / "pipeline_modes.json")
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    print(f"{datetime.now(timezone.utc):%Y-%m-%d} | {device} | torch {torch.__version__} | {args.model} | "
          f"{args.size}x{args.size}, {args.steps} steps", flush=True)
    print(f"{'mode':>9} | {'batch':>5} | {'it/s':>7} | {'images/s':>8}", flush=True)
    rows = []
    for mode in args.modes:
        try:
            runner = DiffusionRunner(args.model, MODES[mode])
        except RuntimeUnavailable as exc:
            rows.append({"mode": mode, "unavailable": str(exc)})
            print(f"{mode:>9} | unavailable: {exc}", flush=True)
            continue
        for batch in args.batches:
            row = {"mode": mode, "dtype": str(runner.placement.dtype), **measure(runner, batch, args.size,
                                                                                 args.steps, args.rounds)}
            rows.append(row)
            it = f"{row['it_per_s']:7.2f}" if row["it_per_s"] else "    n/a"
            print(f"{mode:>9} | {batch:>5} | {it} | {row['images_per_s']:8.3f}", flush=True)
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
        "torch": torch.__version__, "model": args.model, "size": args.size, "steps": args.steps, "rows": rows,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
