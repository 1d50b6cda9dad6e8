"""Fair share between API keys: key A queues 100 small jobs, then key B sends one.

    .venv/bin/python bench/key_fairness.py [--jobs 100] [--rounds 3]

Starts the shipped configuration's server with two keys (A and B) and times B's one DashAI
process (created to FINISHED, read from its event stream's end) on an idle server, then right
after A has queued `--jobs` processes of the same size. Keys take turns at the model
(t2i_task/jobs/scheduler.py), so B waits for about one batch of A's, not for all of them; the
time A's whole queue takes is printed beside it for scale. Prints a table; the figures go to
docs/benchmarks.md by hand, with the machine and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_task.local_server import start_server, write_config  # noqa: E402

TASK = "TextToImageGenerationTask"
PARAMETERS = {"num_inference_steps": 10}  # the default model's defaults: 64x64, 10 steps


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)


def session(http: httpx.Client, name: str) -> int:
    answer = http.post("/api/v1/generative-session/", json={"name": name, "task_name": TASK,
                                                            "parameters": PARAMETERS})
    answer.raise_for_status()
    return answer.json()["id"]


def create(http: httpx.Client, session_id: int, prompt: str) -> int:
    answer = http.post("/api/v1/generative-process/", json={"session_id": session_id, "input": [prompt]})
    answer.raise_for_status()
    return answer.json()["id"]


def until_ended(http: httpx.Client, process_id: int) -> None:
    """Reads the process's event stream to its end (the server closes it after the final status)."""
    with http.stream("GET", f"/api/v1/generative-process/{process_id}/events") as events:
        for _ in events.iter_lines():
            pass


def timed(http: httpx.Client, session_id: int) -> float:
    started = time.perf_counter()
    until_ended(http, create(http, session_id, "a green square on a white background"))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        config = write_config(Path(folder), serving={"max_queued_generations": args.jobs + 10})
        server = start_server(config, env={"T2I_API_KEYS": "a:key-a,b:key-b"})
        try:
            with client(server.url, "key-a") as a, client(server.url, "key-b") as b:
                a_session, b_session = session(a, "a's jobs"), session(b, "b's job")
                timed(b, b_session)  # warm-up
                idle = [timed(b, b_session) for _ in range(args.rounds)]
                behind, whole = [], []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    queued = [create(a, a_session, f"a red circle, job {n}") for n in range(args.jobs)]
                    behind.append(timed(b, b_session))
                    until_ended(a, queued[-1])
                    whole.append(time.perf_counter() - started)
        finally:
            server.stop()
    print(f"B's one job, {args.rounds} rounds each (median seconds, created to FINISHED):")
    print(f"  idle server:                     {statistics.median(idle):6.2f}")
    print(f"  behind A's {args.jobs} queued jobs:     {statistics.median(behind):6.2f}"
          f"  ({statistics.median(behind) / statistics.median(idle):.1f}x idle)")
    print(f"  A's {args.jobs} jobs, all of them:      {statistics.median(whole):6.2f}")


if __name__ == "__main__":
    main()
