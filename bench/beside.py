"""The serving-overhead ratios' measurement: a served concurrency in turns with bare pipeline
calls at the batch it should fill, the model worker and the bare pipeline on the same cores."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import httpx
import psutil

from load import client_limits, run_clients, server_roles

if TYPE_CHECKING:
    from benchmark import BarePipeline


class SameCores:
    """The model worker and the bare pipeline on the same cores while a ratio is taken, the API
    worker and the clients on the others: this VM's two cores differ in speed by 10-20%, and which
    is faster changes within minutes (a pure-Python loop on each in turn, 2026-12-03: 318 and 267
    ms, then 189 and 311 ms), so a bare pipeline on one core against a model on the other measured
    the cores, not the server (the model's own call 261 ms against bare 233 ms, the next minute
    249 against 244). The model gets as many cores as the bare pipeline has torch threads."""

    def __init__(self, server_pid: int, threads: int) -> None:
        """`threads`: the bare pipeline's torch threads on the CPU; 0 for a pipeline on a GPU,
        which is not pinned (its CPU work is the API's, not torch's)."""
        cores = sorted(os.sched_getaffinity(0))
        self.all = set(cores)
        self.model = set(cores[-min(threads, len(cores) - 1):]) if threads and len(cores) > 1 else self.all
        self.rest = self.all - self.model or self.all
        roles = server_roles(server_pid)
        self.workers = {roles["model worker"]: self.model, roles["API worker"]: self.rest}

    def __enter__(self) -> SameCores:
        for process, cores in self.workers.items():
            self._pin(process, cores)
        return self

    def __exit__(self, *_) -> None:
        for process in self.workers:
            self._pin(process, self.all)
        os.sched_setaffinity(0, self.all)

    def clients(self) -> None:
        os.sched_setaffinity(0, self.rest)  # this thread: the clients' event loop

    def bare(self) -> None:
        os.sched_setaffinity(0, self.model)  # this thread: the bare pipeline's calls

    @staticmethod
    def _pin(process: psutil.Process, cores: set[int]) -> None:
        for thread in process.threads():  # every thread: the pipeline runs in a worker thread
            try:
                os.sched_setaffinity(thread.id, cores)
            except OSError:  # the thread has ended
                pass


async def interleaved(url: str, concurrency: int, turn_s: float, body: dict, bare: BarePipeline, batch: int,
                      cores: SameCores, turns: int = 6) -> dict:
    """A served concurrency against bare `batch`, in `turns` turns: the clients for `turn_s`, then
    bare calls for as long (the server idle meanwhile), so that both see the machine at the same
    moments. Six turns with both sides alike long: with four, the bare side half as long, one
    run's turns at concurrency 1 gave 0.90-1.02 on a quiet machine (2026-12-03, 20:20), the bare
    side alone 6.34-7.33 images/s within a minute. Turns of seconds rather than single calls: one
    served request in turn with one bare call ran both slower than either runs alone (on two cores, 2026-12-03:
    served 286 ms against a p50 of 209 ms at concurrency 1, bare 250 ms against 210 ms), as if each
    found its caches cold after the other. Each side comes after the other and is counted once
    warm: the served side from its first answer (`steady`), the bare side from its second call.
    (Turns in alternating order ran bare calls after bare calls every other turn, 19% faster at
    concurrency 1 than after a served turn.) The bare calls run on the model worker's cores."""
    served, whole_turns, bare_calls = [], [], []  # (images, seconds) of each turn
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(concurrency)) as client:
        for _ in range(turns):
            answered_at: list[float] = []

            def answered(response: httpx.Response, _: float) -> None:
                if response.status_code == 200:
                    answered_at.append(time.perf_counter())

            cores.clients()
            wall = await run_clients(client, concurrency, turn_s, body, answered)
            served.append(steady(answered_at, body["n"]))
            whole_turns.append((body["n"] * len(answered_at), wall))
            cores.bare()
            bare.call_s(batch)  # warm again after the served turn
            calls = [bare.call_s(batch)]
            while sum(calls) < turn_s:
                calls.append(bare.call_s(batch))
            bare_calls.append((batch * len(calls), sum(calls)))

    def rate(figures: list[tuple[int, float]]) -> float:
        seconds = sum(s for _, s in figures)
        return sum(images for images, _ in figures) / seconds if seconds else 0.0

    each = [{"served_images_per_s": rate([s]), "bare_images_per_s": rate([b]),
             "served_whole_turn_images_per_s": rate([w])} for s, b, w in zip(served, bare_calls, whole_turns)]
    ratios = [turn["served_images_per_s"] / turn["bare_images_per_s"] for turn in each if turn["bare_images_per_s"]]
    spread = f"; turns {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
    return {"batch": batch, "how": f"interleaved, {turns} turns{spread}", "served_images_per_s": rate(served),
            "bare_images_per_s": rate(bare_calls), "turns": each}


def steady(answered_at: list[float], images_per_answer: int) -> tuple[int, float]:
    """(images, seconds) of a turn from its first answer to its last. A turn starts from an idle
    server: its first request goes alone to the model and the others wait behind it (at
    concurrency 16, 2026-12-03: mean batch 7.1-7.3 of 8 in 5 s turns, counted from the start),
    which bare calls of a full batch never pay. From the first answer on, the model runs full
    batches: every request sent before the turn's end is answered, in whole calls."""
    if len(answered_at) < 2:
        return 0, 0.0
    return images_per_answer * (len(answered_at) - 1), max(answered_at) - min(answered_at)
