"""The cost of switching adapters: 50/50 traffic with and without a LoRA adapter against plain traffic.

    .venv/bin/python bench/adapters_mix.py [--adapter ring] [--seconds 20] [--concurrency 16] [--rounds 2]

Starts the shipped configuration's server and runs closed-loop clients on its default model, in
turns: all without an adapter, then half of them (clients 0, 2, 4, ...) with the adapter at
scale 1. Requests with different adapter sets never share a pipeline call, and each call sets its
adapters before it runs; the ratio mixed / plain images per second is what that costs. Goal (the
LoRA issue): at least 0.8. Prints a table; the figures go to docs/benchmarks.md by hand, with the
machine and date.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_task.config.settings import load_settings  # noqa: E402
from t2i_task.local_server import start_server, write_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling modules
from models_mix import turn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None, help="default: the default model's first usable adapter")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    model = load_settings().default_model
    body = {"prompt": "a yellow ring on a blue background", "n": 1, "response_format": "b64_json",
            "size": f"{model.defaults.width}x{model.defaults.height}"}
    with tempfile.TemporaryDirectory(prefix="t2i-adapters-bench-") as folder:
        server = start_server(write_config(Path(folder)))
        try:
            with httpx.Client(base_url=server.url, timeout=600) as http:
                listed = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == model.name)["adapters"]
                usable = [a["name"] for a in listed if a["status"] in ("ok", "not checked yet")]
                adapter = args.adapter or (usable[0] if usable else None)
                if adapter not in usable:
                    print(f"no usable adapter {adapter!r} for {model.name}: {listed}")
                    return 1
                with_adapter = {**body, "loras": [{"name": adapter, "scale": 1.0}]}
                for i in range(20):  # warm-up, both kinds
                    http.post("/v1/images/generations", json={**(with_adapter if i % 2 else body), "seed": i})
            plain, mixed = [], []
            for round_ in range(args.rounds):
                plain.append(asyncio.run(turn(server.url, args.concurrency, args.seconds, lambda i: body)))
                mixed.append(asyncio.run(turn(server.url, args.concurrency, args.seconds,
                                              lambda i: with_adapter if i % 2 == 0 else body)))
                print(f"round {round_ + 1}: plain {plain[-1]:.2f} images/s, 50/50 with {adapter} {mixed[-1]:.2f}",
                      flush=True)
        finally:
            server.stop()
    ratio = statistics.fmean(mixed) / statistics.fmean(plain)
    print(f"| traffic at {args.concurrency} concurrent | images/s |\n|---|---:|\n"
          f"| all without an adapter | {statistics.fmean(plain):.2f} |\n"
          f"| half with `{adapter}`, half without | {statistics.fmean(mixed):.2f} |\n\n"
          f"mixed / plain: {ratio:.3f} (goal: at least 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
