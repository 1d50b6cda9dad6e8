"""Two models on one server at 16 concurrent: 50/50 mixed traffic against each model on its own.

    .venv/bin/python bench/models_mix.py [--seconds 20] [--concurrency 16] [--rounds 2]

Starts the shipped configuration's server, with a second model beside the default when the
registry has only one (a copy of the default's weights under another name: the same work per
image, but a pipeline of its own, so the two never share a call). Closed-loop clients then run,
in turns: all on model A, all on model B, and half on each (clients 0, 2, 4, ... on A). The
mixed rate is compared with what the same mix gets when each model runs on its own for its
share of the time: N/2 images of A at A's rate, then N/2 of B at B's, i.e. the harmonic mean of
the two rates. Goal (the several-models issue): at least 0.9. Prints a table; the figures go to
docs/benchmarks.md by hand, with the machine and date.
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
from load import client_limits, log, run_clients  # noqa: E402


def registry() -> list[dict]:
    """The shipped registry's first two models, or its default and a copy of it named `<default>-copy`."""
    settings = load_settings()
    models = [model.entry.model_dump() | {"path": model.path} for model in settings.served_models]
    if len(models) == 1:
        models.append(models[0] | {"name": f"{models[0]['name']}-copy", "aliases": []})
    return models[:2]


async def turn(url: str, concurrency: int, seconds: float, body_for) -> float:
    """Images per second of `concurrency` closed-loop clients over `seconds`, counted from answers."""
    images = 0

    def answered(response: httpx.Response, _: float) -> None:
        nonlocal images
        if response.status_code == 200:
            images += len(response.json()["data"])

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(concurrency)) as client:
        wall = await run_clients(client, concurrency, seconds, body_for, answered)
    return images / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="turns of each kind, alternated")
    args = parser.parse_args(argv)

    models = registry()
    a, b = models[0]["name"], models[1]["name"]
    folder = Path(tempfile.mkdtemp(prefix="t2i-models-mix-"))
    server = start_server(write_config(folder, models=models, default_model=a, runtime={"max_loaded_models": 2},
                                       serving={"model_load_wait_s": 120}), timeout=180)
    body = {"prompt": "a red circle on a blue background", "size": "auto", "response_format": "b64_json"}
    rates: dict[str, list[float]] = {"A": [], "B": [], "mixed": []}
    try:
        asyncio.run(turn(server.url, args.concurrency, 3, lambda i: {**body, "model": (a, b)[i % 2]}))  # both loaded
        for round_ in range(args.rounds):
            for kind, body_for in (("A", lambda i: {**body, "model": a}), ("B", lambda i: {**body, "model": b}),
                                   ("mixed", lambda i: {**body, "model": (a, b)[i % 2]})):
                rates[kind].append(asyncio.run(turn(server.url, args.concurrency, args.seconds, body_for)))
                log(f"round {round_ + 1}, {kind}: {rates[kind][-1]:.2f} images/s")
    finally:
        server.stop()
    rate_a, rate_b, mixed = (statistics.fmean(rates[kind]) for kind in ("A", "B", "mixed"))
    alone = 2 / (1 / rate_a + 1 / rate_b)  # the same mix, each model on its own for its share of the time
    log(f"{a}: {rate_a:.2f} images/s alone; {b}: {rate_b:.2f}; the mix model by model: {alone:.2f}")
    log(f"mixed 50/50 at concurrency {args.concurrency}: {mixed:.2f} images/s, {mixed / alone:.3f} of that "
        f"(goal: at least 0.9)")
    return 0 if mixed / alone >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
