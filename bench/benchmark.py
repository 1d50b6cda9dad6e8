"""The benchmark suite behind `make bench`: the bare pipeline's ceiling, then the real server under load.

At the served model's defaults (configuration.yaml's `defaults`: size, steps, guidance):

1. Bare pipeline: images/s and latency of one `pipeline(...)` call at each
   batch size, on the configured model and runtime (the ceiling the server can
   reach).
2. Served: `bentoml serve` on a free loopback port (fresh database and images
   folder), then, at each concurrency, a closed loop of clients calling the
   OpenAI endpoint (`b64_json`) for a fixed time: throughput, p50/p95/p99
   latency, answers by status, the mean adaptive batch size (from /metrics),
   the peak memory of the server's processes and the CPU each process spent
   per image (API worker, model worker, and this load generator).
3. At the highest concurrency, a burst of DashAI processes: each is accepted
   (201) or refused (429/503, JSON), and every accepted one must end FINISHED
   or ERROR.
4. A larger workload (`--large-size`, 128x128 by default, drawn at that size)
   where the step loop dominates: bare batch 1 and 8 against concurrency 1 and 16.

The ratios compare a served level with the bare pipeline measured beside it,
not with the table measured minutes earlier (this machine's speed drifts by as
much as the targets' margins within a minute): after the level, a second run
of it in six turns of the clients for a quarter of the level's time (5 s), each
followed by as long of bare calls at the batch the level should fill (batch 1
at concurrency 1, 8 at 16), the
server idle meanwhile, the model worker and the bare pipeline on the same cores
(bench/beside.py).

Writes bench/results.json and bench/results.png (throughput and p95 latency
against concurrency, the bare ceiling as a line) and rewrites the generated
section of docs/benchmarks.md. Its last two lines are the serving-overhead
ratios (served concurrency 16 / bare batch 8, served concurrency 1 / bare
batch 1); it exits 1 if either is below `--fail-below` (0.9).

    python bench/benchmark.py [--concurrency 1 4 16 64] [--seconds 20] [--large-size 0]
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
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from t2i_task.config.settings import DEFAULT_CONFIG_PATH, load_settings
from t2i_task.config.sizes import DrawnSizes
from t2i_task.local_server import PROJECT_ROOT, start_server, write_config

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: its sibling modules
from beside import SameCores, interleaved  # noqa: E402
from load import batch_totals, closed_loop, dashai_burst, log  # noqa: E402

RESULTS = PROJECT_ROOT / "bench" / "results.json"
CHART = PROJECT_ROOT / "bench" / "results.png"
DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
DOC_START, DOC_END = "<!-- make bench: start -->", "<!-- make bench: end -->"


# 1. The bare pipeline


class BarePipeline:
    """The configured model's pipeline, called directly: the ceiling the server can reach."""

    def __init__(self, model_path: str, runtime, size: int, steps: int, guidance: float) -> None:
        import torch

        from t2i_task.generation.runner import DiffusionRunner

        runner = DiffusionRunner(model_path, runtime)  # same loading, placement and threads as the server's
        self.pipeline, self.device = runner.pipeline, runner.placement.device
        # torch's threads as the runner set them, for a pipeline on the CPU (none pinned on a GPU)
        self.cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        self.size, self.steps, self.guidance = size, steps, guidance

    def call_s(self, batch: int) -> float:
        """Seconds one call of `batch` images takes."""
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            self.pipeline(prompt=[f"a red circle {i}" for i in range(batch)], num_inference_steps=self.steps,
                          guidance_scale=self.guidance, width=self.size, height=self.size, output_type="pil",
                          generator=[torch.Generator(self.device).manual_seed(i) for i in range(batch)])
        return time.perf_counter() - started

    def measure(self, batch: int, rounds: int) -> dict:
        """Median images/s and latency of `rounds` calls of `batch` images, after one warm-up call."""
        self.call_s(batch)
        median = statistics.median(self.call_s(batch) for _ in range(rounds))
        return {"batch": batch, "images_per_s": batch / median, "latency_ms": median * 1000}


def measure_bare_pipeline(bare: BarePipeline, batches: list[int], rounds: int) -> list[dict]:
    rows = []
    for batch in batches:
        row = bare.measure(batch, rounds)
        rows.append(row)
        log(f"  bare batch {batch:>2}: {row['images_per_s']:7.2f} images/s, {row['latency_ms']:7.1f} ms per call")
    return rows


# 2. The server under load (load.py), its ratios taken beside the bare pipeline (beside.py)


def measure_server(config: Path, levels: list[int], seconds: float, body: dict, parameters: dict | None,
                   bare: BarePipeline | None = None, **overrides) -> tuple[list[dict], dict | None]:
    """Served figures at each concurrency level; then, given `parameters`, the DashAI burst.

    Given `bare`, each level a ratio is taken at (RATIOS) also gets the bare pipeline beside it,
    at the batch that level should fill: this machine's speed drifts by as much as the ratios'
    margins within a minute. After such a level, a second run of it takes turns with bare calls
    (`interleaved`)."""
    burst = None
    with tempfile.TemporaryDirectory(prefix="t2i-bench-") as folder:
        server = start_server(write_config(Path(folder), base=config, **overrides))
        try:
            log(f"  server ready at {server.url}; warming up (BentoML trains its batching model first)")
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for i in range(30):
                    client.post("/v1/images/generations", json={**body, "seed": i}).raise_for_status()
            rows = []
            for concurrency in levels:
                log(f"  concurrency {concurrency} for {seconds:.0f}s")
                batch = RATIO_BATCH.get(concurrency) if bare else None
                before = batch_totals(server.url)
                row = {"concurrency": concurrency, **asyncio.run(
                    closed_loop(server.url, concurrency, seconds, body, server.process.pid))}
                after = batch_totals(server.url)
                row["mean_batch_size"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                if batch:
                    with SameCores(server.process.pid, bare.cpu_threads) as cores:
                        row["beside"] = asyncio.run(interleaved(server.url, concurrency, body=body, bare=bare,
                                                                batch=batch, cores=cores, turn_s=seconds / 4))
                    log(f"  beside it, bare batch {batch} ({row['beside']['how']}): served "
                        f"{row['beside']['served_images_per_s']:.2f}, bare {row['beside']['bare_images_per_s']:.2f} images/s")
                rows.append(row)
                cpu = ", ".join(f"{role} {ms:.1f}" for role, ms in row["cpu_ms_per_image"].items())
                log(f"  -> {row['images_per_s']:.1f} images/s, p50 {row['p50_ms']:.0f} ms, "
                    f"p95 {row['p95_ms']:.0f} ms, mean batch {row['mean_batch_size']:.2f}, {row['statuses']}; "
                    f"CPU ms per image: {cpu}")
            if parameters is not None:
                log(f"  DashAI burst of {levels[-1]} processes")
                burst = asyncio.run(dashai_burst(server.url, levels[-1], parameters))
                log(f"  -> {burst}")
        finally:
            server.stop()
    return rows, burst


# 3. Reporting


# (served concurrency, bare batch, target): the serving-overhead ratios `make bench` ends with.
RATIOS = ((16, 8, 0.95), (1, 1, 0.92))
RATIO_BATCH = {level: batch for level, batch, _ in RATIOS}


def overhead_ratios(bare: list[dict], served: list[dict]) -> list[dict]:
    """Served images/s at a concurrency over bare images/s at the batch it should fill: as measured
    beside that level where it was, else against the bare table."""
    bare_by_batch = {row["batch"]: row for row in bare}
    served_by_level = {row["concurrency"]: row for row in served}
    ratios = []
    for level, batch, target in RATIOS:
        row = served_by_level.get(level)
        if row and "beside" in row:
            served_ips, bare_ips, how = (row["beside"]["served_images_per_s"], row["beside"]["bare_images_per_s"],
                                         row["beside"]["how"])
        elif row and batch in bare_by_batch:
            served_ips, bare_ips, how = row["images_per_s"], bare_by_batch[batch]["images_per_s"], "bare table"
        else:
            continue
        ratios.append({"concurrency": level, "batch": batch, "target": target, "ratio": served_ips / bare_ips,
                       "served": served_ips, "bare": bare_ips, "how": how})
    return ratios


def check_targets(bare: list[dict], served: list[dict], burst: dict) -> list[dict]:
    by_concurrency = {row["concurrency"]: row for row in served}
    targets = [{"target": f"images/s at concurrency {r['concurrency']} >= {r['target']:.2f} x bare batch {r['batch']}",
                "value": f"{r['served']:.2f} / {r['bare']:.2f} = {r['ratio']:.3f} ({r['how']})",
                "met": r["ratio"] >= r["target"]}
               for r in overhead_ratios(bare, served)]
    if 16 in by_concurrency:
        errors = by_concurrency[16]["server_errors"]
        targets.append({"target": "no 5xx at concurrency 16", "value": f"{errors} 5xx", "met": errors == 0})
    top = served[-1]
    bad = top["server_errors"] + top["non_json_errors"] + sum(
        count for code, count in top["statuses"].items() if code not in ("200", "429", "503"))
    targets.append({"target": f"at concurrency {top['concurrency']} only 200/429/503 with JSON bodies",
                    "value": f"{top['statuses']}", "met": bad == 0})
    targets.append({"target": "every accepted DashAI process ends FINISHED or ERROR",
                    "value": f"{burst['accepted']} accepted, ended {burst['ended']}, stuck {burst['stuck']}",
                    "met": burst["stuck"] == 0 and burst["all_json"]})
    return targets


def draw_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = results["served"]
    levels = [row["concurrency"] for row in served]
    figure, throughput = plt.subplots(figsize=(7, 4.2))
    throughput.plot(levels, [row["images_per_s"] for row in served], "o-", color="tab:blue", label="served images/s")
    ceiling = max(row["images_per_s"] for row in results["bare"])
    throughput.axhline(ceiling, color="tab:blue", linestyle="--", label=f"bare pipeline best ({ceiling:.0f}/s)")
    throughput.set_xscale("log", base=2)
    throughput.set_xticks(levels, [str(level) for level in levels])
    throughput.set_xlabel("concurrent clients")
    throughput.set_ylabel("images/s")
    latency = throughput.twinx()
    latency.plot(levels, [row["p95_ms"] for row in served], "s-", color="tab:red", label="p95 latency (ms)")
    latency.set_ylabel("p95 latency (ms)")
    lines = throughput.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
    labels = throughput.get_legend_handles_labels()[1] + latency.get_legend_handles_labels()[1]
    throughput.set_ylim(bottom=0, top=ceiling * 1.15)
    latency.set_ylim(bottom=0)
    throughput.legend(lines, labels, loc="lower right", fontsize=8)
    setting = results["setting"]
    figure.suptitle(f"{setting['model']} {setting['size']}x{setting['size']}, {setting['steps']} steps, "
                    f"{results['machine']['cpus']} CPUs, {results['date'][:10]}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict) -> str:
    setting, machine = results["setting"], results["machine"]
    lines = [
        DOC_START,
        f"Generated by `make bench` on {results['date'][:16].replace('T', ' ')} UTC, {machine['description']}; "
        f"model `{setting['model']}`, {setting['size']}x{setting['size']}, {setting['steps']} steps, guidance "
        f"{setting['guidance']}, {setting['seconds']:.0f} s per concurrency level, torch threads in the runner "
        f"{setting['torch_threads']}. Raw figures: `bench/results.json`; chart: `bench/results.png`.",
        "",
        "| bare pipeline batch | images/s | ms per call |",
        "|---:|---:|---:|",
        *(f"| {r['batch']} | {r['images_per_s']:.2f} | {r['latency_ms']:.1f} |" for r in results["bare"]),
        "",
        *served_table(results["served"]),
        "",
        f"DashAI burst: {results['dashai_burst']['sent']} processes at once -> answers "
        f"{results['dashai_burst']['statuses']}, {results['dashai_burst']['accepted']} accepted, ended "
        f"{results['dashai_burst']['ended']}, stuck {results['dashai_burst']['stuck']}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]),
        *large_workload(results.get("large")),
        DOC_END,
    ]
    return "\n".join(lines)


def served_table(served: list[dict]) -> list[str]:
    return [
        "| concurrency | requests | images/s | p50 ms | p95 ms | p99 ms | mean batch | 429/503 share | answers | "
        "peak server memory | CPU ms per image (API, model, load generator) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        *(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
          f"{r['p99_ms']:.0f} | {r['mean_batch_size']:.2f} | {100 * r['share_429_503']:.1f}% | "
          f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | {r['peak_memory_mb']:.0f} MB | "
          f"{r['cpu_ms_per_image'].get('API worker', 0):.1f}, {r['cpu_ms_per_image'].get('model worker', 0):.1f}, "
          f"{r['cpu_ms_per_image'].get('load generator', 0):.1f} |"
          for r in served),
    ]


def large_workload(large: dict | None) -> list[str]:
    if not large:
        return []
    return [
        "",
        f"Larger workload, {large['size']}x{large['size']} drawn at that size, same steps and guidance:",
        "",
        "| bare pipeline batch | images/s | ms per call |",
        "|---:|---:|---:|",
        *(f"| {r['batch']} | {r['images_per_s']:.2f} | {r['latency_ms']:.1f} |" for r in large["bare"]),
        "",
        *served_table(large["served"]),
        "",
        *(f"- concurrency {r['concurrency']} / bare batch {r['batch']}: {r['served']:.2f} / {r['bare']:.2f} = "
          f"{r['ratio']:.3f} ({r['how']})" for r in large["ratios"]),
    ]


def update_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if DOC_START in text and DOC_END in text:
        text = text[: text.index(DOC_START)] + section + text[text.index(DOC_END) + len(DOC_END):]
    else:
        text = text.rstrip("\n") + "\n\n## Served benchmark (`make bench`)\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bare-pipeline ceiling and served throughput/latency")
    parser.add_argument("--config", type=Path, default=None, help="configuration file (default: T2I_CONFIG or the project's)")
    parser.add_argument("--size", type=int, default=None, help="default: the configuration's default width")
    parser.add_argument("--steps", type=int, default=None, help="default: the configuration's default steps")
    parser.add_argument("--guidance", type=float, default=None, help="default: the configuration's default guidance")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per concurrency level")
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per bare batch size")
    parser.add_argument("--large-size", type=int, default=128,
                        help="side of the larger workload, drawn at that size (0: skip it)")
    parser.add_argument("--fail-below", type=float, default=0.9, help="exit 1 if a serving-overhead ratio is below this")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose generated section is rewritten")
    parser.add_argument("--no-doc", action="store_true", help="leave the markdown file alone")
    args = parser.parse_args(argv)

    config = (args.config or Path(__import__("os").environ.get("T2I_CONFIG") or DEFAULT_CONFIG_PATH)).resolve()
    settings = load_settings(config)
    from t2i_task.generation.runner import default_cpu_threads

    size = args.size or settings.default_model.defaults.width
    steps = args.steps or settings.default_model.defaults.num_inference_steps
    guidance = settings.default_model.defaults.guidance_scale if args.guidance is None else args.guidance
    started = time.monotonic()
    log(f"[1/3] bare pipeline: {settings.default_model.name}, {size}x{size}, {steps} steps, guidance {guidance}")
    pipeline = BarePipeline(settings.default_model.path, settings.runtime, size, steps, guidance)
    bare = measure_bare_pipeline(pipeline, args.batches, args.rounds)

    log(f"[2/3] server under load at concurrency {args.concurrency}")
    parameters = {"width": size, "height": size, "num_inference_steps": steps, "guidance_scale": guidance}
    served, burst = measure_server(config, args.concurrency, args.seconds, request_body(size, steps, guidance),
                                   parameters, pipeline, **drawn_at(settings.default_model.sizes, size))

    large = None
    if args.large_size:
        big = args.large_size
        log(f"[2b/3] larger workload: {big}x{big}, {steps} steps")
        big_pipeline = BarePipeline(settings.default_model.path, settings.runtime, big, steps, guidance)
        big_rounds = max(2, args.rounds // 3)
        big_bare = measure_bare_pipeline(big_pipeline, [1, 8], big_rounds)
        big_served, _ = measure_server(config, [1, 16], args.seconds, request_body(big, steps, guidance), None,
                                       big_pipeline, **drawn_at(settings.default_model.sizes, big))
        large = {"size": big, "bare": big_bare, "served": big_served, "ratios": overhead_ratios(big_bare, big_served)}

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "description": f"{platform.node()}, {platform.machine()}, {psutil.cpu_count()} CPUs, "
                           f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}",
            "cpus": psutil.cpu_count(),
        },
        "setting": {"model": settings.default_model.name, "size": size, "steps": steps, "guidance": guidance,
                    "seconds": args.seconds, "torch_threads": settings.runtime.cpu_threads or default_cpu_threads(),
                    "max_batch_size": settings.batching.max_batch_size},
        "bare": bare,
        "served": served,
        "dashai_burst": burst,
        "large": large,
        "ratios": overhead_ratios(bare, served),
    }
    results["targets"] = check_targets(bare, served, burst)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    draw_chart(results, args.chart)
    section = markdown(results)
    if not args.no_doc:
        update_doc(args.doc, section)

    log(f"[3/3] done in {time.monotonic() - started:.0f}s: {args.results}, {args.chart}"
        + ("" if args.no_doc else f", {args.doc}"))
    print(section.replace(DOC_START, "").replace(DOC_END, ""))
    failed = False
    for r in results["ratios"]:
        print(f"served concurrency {r['concurrency']} / bare batch {r['batch']}: {r['ratio']:.3f} "
              f"({r['served']:.2f} / {r['bare']:.2f} images/s; target {r['target']:.2f})")
        failed = failed or r["ratio"] < args.fail_below
    return 1 if failed else 0


def request_body(size: int, steps: int, guidance: float) -> dict:
    return {"prompt": "a red circle on a blue background", "size": f"{size}x{size}", "n": 1,
            "response_format": "b64_json", "num_inference_steps": steps, "guidance_scale": guidance}


def drawn_at(sizes: DrawnSizes | None, size: int) -> dict:
    """Configuration overrides under which the served model draws `size` itself, as the bare
    pipeline does, rather than a size from model.sizes' range resized."""
    if sizes is None:  # every size is drawn as asked
        return {}
    return {"model": {"sizes": {**sizes.model_dump(), "min": min(size, sizes.min), "max": max(size, sizes.max)}}}


if __name__ == "__main__":
    sys.exit(main())
