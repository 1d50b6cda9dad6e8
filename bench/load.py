"""Load on a running server for `make bench`: closed-loop clients on the OpenAI endpoint, a burst
of DashAI processes, and what the server's processes spent meanwhile (CPU, memory, batch sizes
from /metrics)."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import Callable

import httpx
import psutil

BATCH_METRIC = re.compile(
    r'^t2i_model_batch_size_(sum|count)(?:\{[^}]*\})? (\S+)$', re.MULTILINE
)


def log(message: str) -> None:
    print(message, flush=True)


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def batch_totals(url: str) -> tuple[float, float]:
    totals = {kind: float(value) for kind, value in BATCH_METRIC.findall(httpx.get(f"{url}/metrics").text)}
    return totals.get("sum", 0.0), totals.get("count", 0.0)


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far."""
    used = {}
    for role, process in processes.items():
        try:
            times = process.cpu_times()
            used[role] = times.user + times.system
        except psutil.Error:
            used[role] = 0.0
    return used


def server_roles(server_pid: int) -> dict[str, psutil.Process]:
    """The server's worker processes by role, and this load generator."""
    roles = {"load generator": psutil.Process()}
    for child in psutil.Process(server_pid).children(recursive=True):
        command = " ".join(child.cmdline())
        roles["model worker" if "t2i-diffusion" in command else "API worker"] = child
    return roles


def server_memory_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


async def run_clients(client: httpx.AsyncClient, concurrency: int, seconds: float, body: dict | Callable[[int], dict],
                      answered: Callable[[httpx.Response, float], None]) -> float:
    """`concurrency` clients, each sending its next request when the last is answered, until
    `seconds` have passed; `body` is every client's request, or `body(index)` each client's own;
    `answered(response, seconds it took)` sees each answer. Returns the wall time until the last answer."""
    deadline = time.monotonic() + seconds

    async def user(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.perf_counter()
            sent = body(index) if callable(body) else body
            response = await client.post("/v1/images/generations", json={**sent, "seed": index * 100_000 + n})
            answered(response, time.perf_counter() - started)
            if response.status_code != 200:
                await asyncio.sleep(0.05)  # a refused client backs off a little, as real ones do

    wall = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(concurrency)))
    return time.perf_counter() - wall


def client_limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


async def closed_loop(url: str, concurrency: int, seconds: float, body: dict, server_pid: int) -> dict:
    """`concurrency` closed-loop clients for `seconds`: throughput, latency, answers, memory and CPU."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    non_json_errors = 0
    peak_memory = server_memory_mb(server_pid)
    roles = server_roles(server_pid)
    cpu_before = cpu_seconds(roles)

    def answered(response: httpx.Response, elapsed: float) -> None:
        nonlocal non_json_errors
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            latencies.append(elapsed)
            return
        try:
            response.json()
        except ValueError:
            non_json_errors += 1

    async def watch(load: asyncio.Task) -> None:
        nonlocal peak_memory
        started = time.monotonic()
        while not load.done():
            await asyncio.sleep(1)
            peak_memory = max(peak_memory, server_memory_mb(server_pid))
            log(f"    {time.monotonic() - started:4.0f}s: {sum(statuses.values())} answers")

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(concurrency)) as client:
        load = asyncio.ensure_future(run_clients(client, concurrency, seconds, body, answered))
        watcher = asyncio.ensure_future(watch(load))
        wall = await load
        watcher.cancel()

    answered_count = sum(statuses.values())
    images = max(1, len(latencies) * body["n"])
    cpu_after = cpu_seconds(roles)
    return {
        "cpu_ms_per_image": {role: 1000 * (cpu_after[role] - cpu_before[role]) / images for role in roles},
        "requests": answered_count,
        "images_per_s": len(latencies) * body["n"] / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "share_429_503": (statuses.get(429, 0) + statuses.get(503, 0)) / answered_count if answered_count else 0.0,
        "server_errors": sum(count for code, count in statuses.items() if code >= 500 and code != 503),
        "non_json_errors": non_json_errors,
        "peak_memory_mb": peak_memory,
    }


async def dashai_burst(url: str, concurrency: int, parameters: dict) -> dict:
    """`concurrency` DashAI processes at once; every accepted one must end."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        session = await client.post("/api/v1/generative-session/", json={
            "task_name": "TextToImageGenerationTask", "name": f"bench-{time.time_ns()}", "parameters": parameters,
        })
        session.raise_for_status()
        answers = await asyncio.gather(*(
            client.post("/api/v1/generative-process/", json={"session_id": session.json()["id"], "input": [f"p{i}"]})
            for i in range(concurrency)
        ))
        accepted = [a.json()["id"] for a in answers if a.status_code == 201]
        refused_json = all(a.headers.get("content-type", "").startswith("application/json") for a in answers)
        ended: dict[str, int] = {}
        deadline = time.monotonic() + 600
        pending = set(accepted)
        while pending and time.monotonic() < deadline:
            for process_id in list(pending):
                status = (await client.get(f"/api/v1/generative-process/{process_id}")).json()["status"]
                if status in (3, 4):
                    pending.discard(process_id)
                    name = {3: "FINISHED", 4: "ERROR"}[status]
                    ended[name] = ended.get(name, 0) + 1
            await asyncio.sleep(0.2)
    statuses: dict[str, int] = {}
    for answer in answers:
        statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1
    return {"sent": concurrency, "statuses": statuses, "accepted": len(accepted), "ended": ended,
            "stuck": len(pending), "all_json": refused_json}
