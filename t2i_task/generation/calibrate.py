"""`make calibrate`: measure what a generation costs here, and store it with the model's settings.

Loads the configured model as the server would (same device, dtype and
attention), times single images at the default step count at the smallest and the
largest allowed size, and draws `seconds = overhead + rate x megapixels x
steps` (t2i_task/config/cost.py) through the two. A step's cost grows faster than its
pixels (attention is quadratic in them), so between the two sizes this line
lies above the real cost: the estimate errs on the safe side everywhere a
request may go. A size in between is timed as a check. The figures go to the
`cost:` line of the model's section in the configuration file. Run it on the machine
that serves, with nothing else running: the limits the server enforces follow.

    python -m t2i_task.generation.calibrate [--config configuration.yaml] [--model NAME] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path

from t2i_task.config.cost import MEGAPIXEL, GenerationCost
from t2i_task.config.models import ServedModel
from t2i_task.config.settings import DEFAULT_CONFIG_PATH, load_settings
from t2i_task.generation.runner import DiffusionRunner, GenerationRequest

RUNS_PER_SIZE = 2


def sizes_to_measure(model: ServedModel) -> list[int]:
    """The smallest and largest square sides the model draws (its `sizes`, or the allowed ones)
    and one between, multiples of 8."""
    drawn = model.sizes
    smallest = drawn.min if drawn else -(-model.limits.min_size // 8) * 8
    largest = drawn.max if drawn else min(model.limits.max_width, model.limits.max_height)
    middle = (smallest + largest) // 2 // 8 * 8
    return sorted({smallest, middle, largest})


def measure(runner: DiffusionRunner, model: ServedModel) -> tuple[GenerationCost, list[tuple[int, float]]]:
    steps = model.defaults.num_inference_steps

    def seconds(side: int) -> float:
        request = GenerationRequest(prompt="calibration", num_inference_steps=steps,
                                    guidance_scale=model.defaults.guidance_scale, width=side, height=side, seed=0)
        started = time.perf_counter()
        [result] = runner.generate([request])
        if result.error:
            raise RuntimeError(f"calibration failed at {side}x{side}: {result.error}")
        return time.perf_counter() - started

    sides = sizes_to_measure(model)
    seconds(sides[0])  # warm-up: first-call allocations and kernel choices
    timings = [(side, statistics.median(seconds(side) for _ in range(RUNS_PER_SIZE))) for side in sides]
    (small, t_small), (large, t_large) = timings[0], timings[-1]
    w_small, w_large = small * small / MEGAPIXEL * steps, large * large / MEGAPIXEL * steps
    slope = (t_large - t_small) / (w_large - w_small) if large > small else 0.0
    # Below zero is timing noise around a tiny overhead; zero only raises the estimate.
    intercept = max(0.0, t_small - slope * w_small)
    if slope <= 0:  # the sizes cost the same within the noise: charge every pixel-step at the dearest rate
        slope = max(seconds / (side * side / MEGAPIXEL * steps) for side, seconds in timings)
        intercept = 0.0
    placement = runner.placement
    cores = len(os.sched_getaffinity(0))
    machine = torch_device_name(placement.device) or f"{cores}-core {platform.machine()} CPU"
    measured_on = f"{machine}, {str(placement.dtype).removeprefix('torch.')}, {datetime.date.today().isoformat()}"
    cost = GenerationCost(overhead_s=float(f"{intercept:.4g}"), seconds_per_megapixel_step=float(f"{slope:.4g}"),
                          measured_on=measured_on)
    return cost, timings


def torch_device_name(device) -> str | None:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def cost_line(cost: GenerationCost, indent: str) -> str:
    return (f"{indent}cost: {{overhead_s: {cost.overhead_s}, seconds_per_megapixel_step: "
            f"{cost.seconds_per_megapixel_step}, measured_on: \"{cost.measured_on}\"}}")


def store(config_path: Path, cost: GenerationCost, model_name: str | None = None) -> None:
    """Replace the `cost:` line of the model's entry (the one whose `name:` is `model_name`; None: the
    file's only model), or add one after its `path:` line; every other line, comments included, stays."""
    text = config_path.read_text()
    settings = load_settings(config_path)
    name = model_name or settings.default_model.name
    names = list(re.finditer(r"^(?:\s*-)?\s+name:\s*[\"']?([^\"'#\n]+?)[\"']?\s*(?:#.*)?$", text, flags=re.MULTILINE))
    [start] = [match.start() for match in names if match[1] == name] or [None]
    if start is None:
        raise SystemExit(f"{config_path}: no model entry with `name: {name}`")
    ends = [match.start() for match in names if match.start() > start]
    section = re.search(r"^\S", text[start + 1:], flags=re.MULTILINE)  # the next top-level key
    end = min([*ends, start + 1 + section.start() if section else len(text)])
    entry = text[start:end]
    existing = re.search(r"^( +)cost:.*$", entry, flags=re.MULTILINE)
    if existing:
        entry = entry[: existing.start()] + cost_line(cost, existing[1]) + entry[existing.end():]
    else:
        path_line = re.search(r"^( +)path:.*$", entry, flags=re.MULTILINE)
        if not path_line:
            raise SystemExit(f"{config_path}: model {name} has no path line to put the cost after; add it by hand")
        entry = entry[: path_line.end()] + "\n" + cost_line(cost, path_line[1]) + entry[path_line.end():]
    config_path.write_text(text[:start] + entry + text[end:])
    load_settings(config_path)  # still a valid configuration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("T2I_CONFIG") or DEFAULT_CONFIG_PATH))
    parser.add_argument("--model", default=None, help="the registry's model to measure (default: every model)")
    parser.add_argument("--dry-run", action="store_true", help="print the figures, leave the file alone")
    args = parser.parse_args()

    settings = load_settings(args.config)
    models = [settings.served_model(args.model)] if args.model else settings.served_models
    for model in models:
        runner = DiffusionRunner(model.path, settings.runtime, scheduler=model.entry.scheduler,
                                 local_files_only=model.entry.local_files_only)
        cost, timings = measure(runner, model)
        steps = model.defaults.num_inference_steps
        for side, seconds in timings:
            fitted = cost.seconds(side, side, steps)
            print(f"{model.name}, {side}x{side}, {steps} steps: {seconds:.3f} s measured, {fitted:.3f} s fitted")
        print(cost_line(cost, "  ").strip())
        if not args.dry_run:
            store(args.config, cost, model.name)
            print(f"written to {args.config}, model {model.name}")
        del runner


if __name__ == "__main__":
    main()
