"""Bulk jobs beside live traffic (`make bench`, after bench/benchmark.py): the Batch API's two goals.

    .venv/bin/python bench/bulk_fairness.py [--lines 500] [--seconds 20] [--rounds 2]

Starts the shipped configuration's server (the default model at its defaults) on a fresh
database and measures:

1. live requests at concurrency 1 on the idle server: median latency;
2. the same while a batch of `--lines` lines runs: median latency (goal: within 2x of 1);
3. in `--rounds` turns, the batch alone on an otherwise idle server (after the model has been
   the batch's alone for `bulk.alone_after_live_s`, when its lines go in full batches) against
   16 concurrent live clients: images/s of each (goal: the batch at least 0.95 of the live rate).

Rates are counted alike for both, from the stored processes' end times (a batch line and a live
request are both processes): the images that ended after the first one in the window, over the
time from the first to the last. The batch is cancelled at the end. Writes its section of
docs/benchmarks.md and exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_task.config.settings import load_settings  # noqa: E402
from t2i_task.local_server import start_server, write_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling modules
from load import client_limits, log, run_clients  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- make bench bulk: start -->", "<!-- make bench bulk: end -->"
LATENCY_GOAL, RATE_GOAL = 2.0, 0.95


async def live(url: str, concurrency: int, seconds: float, body: dict) -> list[float]:
    """Seconds each answered live request took, from `concurrency` closed-loop clients."""
    latencies: list[float] = []

    def answered(response: httpx.Response, elapsed: float) -> None:
        if response.status_code == 200:
            latencies.append(elapsed)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(concurrency)) as client:
        await run_clients(client, concurrency, seconds, body, answered)
    return latencies


def steady_rate(database: str, since: float, until: float, bulk: bool) -> tuple[float, int]:
    """(images per second, processes counted) of the batch's lines or of the live requests that
    ended in [since, until]: those after the first, over the time from the first to the last."""
    engine = create_engine(database)
    with engine.connect() as db:
        ends = sorted(datetime.fromisoformat(str(row[0])).replace(tzinfo=UTC).timestamp() for row in db.execute(text(
            "SELECT end_time FROM generative_process WHERE status = 'FINISHED' AND batch_id IS "
            + ("NOT NULL" if bulk else "NULL") + " AND priority = :priority"),
            {"priority": 2 if bulk else 0}))
    engine.dispose()
    window = [end for end in ends if since <= end <= until]
    if len(window) < 2:
        return 0.0, len(window)
    first = window[0]
    later = [end for end in window if end > first + 0.05]  # the first call's other images end with it
    return (len(later) / (window[-1] - first) if later else 0.0), len(window)


def batch_file(lines: int, body: dict) -> bytes:
    return "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/images/generations",
                               "body": {**body, "prompt": f"{body['prompt']} {i}", "seed": i}}) + "\n"
                   for i in range(lines)).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)

    settings = load_settings()
    model = settings.default_model
    body = {"prompt": "a red circle on a blue background", "n": 1, "response_format": "b64_json",
            "size": f"{model.defaults.width}x{model.defaults.height}"}
    quiet_s = settings.bulk.alone_after_live_s + 2
    with tempfile.TemporaryDirectory(prefix="t2i-bulk-bench-") as folder:
        server = start_server(write_config(Path(folder)))
        database = f"sqlite:///{Path(folder) / 't2i.db'}"
        try:
            with httpx.Client(base_url=server.url, timeout=600) as http:
                for i in range(20):  # warm-up
                    http.post("/v1/images/generations", json={**body, "seed": i}).raise_for_status()
                log(f"[1/3] live requests at concurrency 1 on the idle server, {args.seconds:.0f}s")
                idle = asyncio.run(live(server.url, 1, args.seconds, body))
                log(f"[2/3] the same while a {args.lines}-line batch runs")
                upload = http.post("/v1/files", files={"file": ("bench.jsonl", batch_file(args.lines, body))},
                                   data={"purpose": "batch"}).json()
                batch = http.post("/v1/batches", json={"input_file_id": upload["id"], "completion_window": "24h",
                                                       "endpoint": "/v1/images/generations"}).json()
                time.sleep(2)  # its lines are claimed and at the model
                before = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"]
                busy = asyncio.run(live(server.url, 1, args.seconds, body))
                during = http.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] - before
                log("[3/3] the batch alone against 16 live clients, in turns")
                turns = []
                for round_ in range(args.rounds):
                    time.sleep(quiet_s)  # the batch's lines go one per call this long after live work
                    since = time.time()
                    time.sleep(args.seconds)
                    bulk_rate, bulk_n = steady_rate(database, since, time.time(), bulk=True)
                    since = time.time()
                    asyncio.run(live(server.url, 16, args.seconds, body))
                    live_rate, live_n = steady_rate(database, since, time.time(), bulk=False)
                    turns.append({"bulk": bulk_rate, "bulk_lines": bulk_n, "live": live_rate, "live_requests": live_n})
                    log(f"  turn {round_ + 1}: batch {bulk_rate:.2f} images/s ({bulk_n} lines), 16 live clients "
                        f"{live_rate:.2f} images/s ({live_n} requests)")
                counts = http.post(f"/v1/batches/{batch['id']}/cancel").json()["request_counts"]
        finally:
            server.stop()

    idle_ms, busy_ms = statistics.median(idle) * 1000, statistics.median(busy) * 1000
    bulk_rate = statistics.fmean(t["bulk"] for t in turns)
    live_rate = statistics.fmean(t["live"] for t in turns)
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "model": model.name, "size": body["size"],
        "machine": f"{platform.node()}, {platform.machine()}, {psutil.cpu_count()} CPUs, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "steps": model.defaults.num_inference_steps, "lines": args.lines, "idle_p50_ms": idle_ms,
        "busy_p50_ms": busy_ms, "busy_p95_ms": statistics.quantiles(busy, n=20)[-1] * 1000 if len(busy) > 1 else busy_ms,
        "lines_during_live": during, "turns": turns, "bulk_rate": bulk_rate, "live_rate": live_rate,
        "completed_at_cancel": counts["completed"],
    }
    section = markdown(results)
    print(section)
    if not args.no_doc:
        text_ = args.doc.read_text()
        if START in text_:
            head, rest = text_.split(START, 1)
            text_ = head + START + "\n" + section + "\n" + END + rest.split(END, 1)[1]
            args.doc.write_text(text_)
    met = busy_ms <= LATENCY_GOAL * idle_ms and bulk_rate >= RATE_GOAL * live_rate
    return 0 if met else 1


def markdown(r: dict) -> str:
    latency_ratio, rate_ratio = r["busy_p50_ms"] / r["idle_p50_ms"], r["bulk_rate"] / r["live_rate"]
    turns = "; ".join(f"{t['bulk']:.2f} vs {t['live']:.2f}" for t in r["turns"])
    return "\n".join([
        f"Generated by `make bench` (bench/bulk_fairness.py) on {r['date']}, {r['machine']}; model `{r['model']}`, {r['size']}, "
        f"{r['steps']} steps; a {r['lines']}-line batch.",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        f"| live p50 at concurrency 1 with the batch running <= {LATENCY_GOAL:g}x the idle server's | "
        f"{r['busy_p50_ms']:.0f} ms / {r['idle_p50_ms']:.0f} ms = {latency_ratio:.2f}x (p95 {r['busy_p95_ms']:.0f} ms; "
        f"{r['lines_during_live']} batch lines ran meanwhile) | {'yes' if latency_ratio <= LATENCY_GOAL else 'no'} |",
        f"| the batch alone >= {RATE_GOAL:g} x 16 live clients' images/s | {r['bulk_rate']:.2f} / {r['live_rate']:.2f} "
        f"= {rate_ratio:.3f} (turns, batch vs live: {turns}) | {'yes' if rate_ratio >= RATE_GOAL else 'no'} |",
    ])


if __name__ == "__main__":
    sys.exit(main())
