"""What progress reporting costs the served throughput: the same server with and without it.

Progress is diffusers' step-end callback in the model worker, a `progress` call
from the API process to the model every 0.5 s while it holds work and a
database write a second (t2i_task/jobs/progress.py). "Off" is the same server with
`bench/hooks/no_progress` loaded: no callback, no watching. The two alternate
for `--rounds` rounds (a fresh server each time), each driven by a closed loop
of `--concurrency` OpenAI clients (`b64_json`) for `--seconds`, after a warm-up;
prints each run and the median images/s of each mode, and their ratio.

    python bench/progress_cost.py [--concurrency 16] [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import closed_loop, log  # noqa: E402

from t2i_task.config.settings import DEFAULT_CONFIG_PATH, load_settings  # noqa: E402
from t2i_task.local_server import PROJECT_ROOT, start_server, write_config  # noqa: E402

NO_PROGRESS_HOOKS = Path(__file__).parent / "hooks" / "no_progress"


def measure(mode: str, config: Path, concurrency: int, seconds: float, body: dict) -> float:
    env = {"PYTHONPATH": f"{NO_PROGRESS_HOOKS}:{PROJECT_ROOT}"} if mode == "off" else None
    with tempfile.TemporaryDirectory(prefix="t2i-progress-cost-") as folder:
        server = start_server(write_config(Path(folder), base=config), env=env)
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for i in range(30):  # BentoML's batcher trains its latency model first
                    client.post("/v1/images/generations", json={**body, "seed": i}).raise_for_status()
            row = asyncio.run(closed_loop(server.url, concurrency, seconds, body, server.process.pid))
        finally:
            server.stop()
    if set(row["statuses"]) != {"200"}:
        raise RuntimeError(f"{mode}: answers other than 200: {row['statuses']}")
    log(f"  progress {mode}: {row['images_per_s']:.2f} images/s, p50 {row['p50_ms']:.0f} ms, "
        f"p99 {row['p99_ms']:.0f} ms")
    return row["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    defaults = load_settings(args.config).defaults
    body = {"prompt": "a red circle on a blue background", "n": 1, "response_format": "b64_json",
            "size": f"{defaults.width}x{defaults.height}", "num_inference_steps": defaults.num_inference_steps,
            "guidance_scale": defaults.guidance_scale}
    log(f"progress on vs off: concurrency {args.concurrency}, {args.seconds:.0f} s a run, {args.rounds} rounds, "
        f"{body['size']} at {body['num_inference_steps']} steps")
    runs: dict[str, list[float]] = {"on": [], "off": []}
    for round_number in range(args.rounds):
        order = ("on", "off") if round_number % 2 == 0 else ("off", "on")
        for mode in order:
            runs[mode].append(measure(mode, args.config, args.concurrency, args.seconds, body))
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    print(f"progress on:  {on:.2f} images/s (runs {', '.join(f'{x:.2f}' for x in runs['on'])})")
    print(f"progress off: {off:.2f} images/s (runs {', '.join(f'{x:.2f}' for x in runs['off'])})")
    print(f"cost of progress: {100 * (1 - on / off):.1f}% of the throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
