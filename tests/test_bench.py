"""The benchmark and load-test commands run end to end on a tiny setting (figures are not checked)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from PIL import Image

from t2i_task.local_server import PROJECT_ROOT

LOCUST = PROJECT_ROOT / ".venv" / "bin" / "locust"


def test_bench_writes_results_chart_and_doc_section_and_ends_with_its_ratios(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- make bench: start -->\nold\n<!-- make bench: end -->\n\ntail\n")
    done = subprocess.run(
        [sys.executable, "bench/benchmark.py", "--concurrency", "1", "4", "--seconds", "2", "--rounds", "1",
         "--batches", "1", "2", "--large-size", "40", "--results", str(tmp_path / "r.json"),
         "--chart", str(tmp_path / "r.png"), "--doc", str(doc)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert "[3/3] done" in done.stdout and "| concurrency |" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((tmp_path / "r.json").read_text())
    assert [row["batch"] for row in results["bare"]] == [1, 2]
    assert all(row["images_per_s"] > 0 for row in results["bare"])
    assert [row["concurrency"] for row in results["served"]] == [1, 4]
    for row in results["served"]:
        assert row["requests"] > 0 and row["statuses"].get("200", 0) > 0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_batch_size"] >= 1 and row["peak_memory_mb"] > 0
        assert row["cpu_ms_per_image"]["model worker"] > 0 and row["cpu_ms_per_image"]["API worker"] > 0
    assert results["dashai_burst"]["stuck"] == 0
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    assert results["large"]["size"] == 40 and [r["concurrency"] for r in results["large"]["served"]] == [1, 16]
    # Its concurrency 16 is measured in turns with bare batch 8.
    big = results["large"]["ratios"][0]
    assert (big["concurrency"], big["batch"]) == (16, 8) and big["how"].startswith("interleaved, 6 turns")
    assert big["served"] > 0 and big["bare"] > 0

    # The run ends with its ratio (concurrency 1 over bare batch 1: no 16 here), and fails below 0.9.
    [ratio] = results["ratios"]
    beside = results["served"][0]["beside"]  # served requests and bare calls in turns
    assert (beside["batch"], len(beside["turns"])) == (1, 6)
    assert beside["how"].startswith("interleaved, 6 turns; turns ")
    assert (ratio["served"], ratio["bare"]) == (beside["served_images_per_s"], beside["bare_images_per_s"])
    assert ratio["bare"] > 0 and ratio["served"] > 0
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("served concurrency 1 / bare batch 1: ") and f"{ratio['ratio']:.3f}" in last
    assert done.returncode == (1 if ratio["ratio"] < 0.9 else 0), done.stderr[-3000:]

    assert Image.open(tmp_path / "r.png").format == "PNG"
    text = doc.read_text()
    assert "old" not in text and "kept" in text and "tail" in text and "| bare pipeline batch |" in text


def test_the_served_rate_of_a_turn_runs_from_its_first_answer_to_its_last():
    """The turn's start (one request alone at an idle model, the rest waiting behind it) does not
    count against the server; from the first answer on, every answer does."""
    sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # as the bench scripts run
    from beside import steady

    # The first request answered alone at 0.3 s, then calls of 8 answered at 1.3 and 2.3 s.
    answered_at = [0.3] + [1.3] * 8 + [2.3] * 8
    images, seconds = steady(answered_at, images_per_answer=2)
    assert (images, round(seconds, 9)) == (2 * 16, 2.0)
    assert steady([0.3], images_per_answer=1) == (0, 0.0)  # one answer says nothing of a rate


def test_locustfile_runs_both_user_kinds_without_failures(server, tmp_path):
    done = subprocess.run(
        [str(LOCUST), "-f", "loadtest/locustfile.py", "--headless", "--host", server.url, "-u", "4", "-r", "4",
         "-t", "6s", "--csv", str(tmp_path / "load"), "--only-summary"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "load_stats.csv").open())}
    assert int(rows["/v1/images/generations"]["Request Count"]) > 0
    assert int(rows["/api/v1/generative-process/ [create]"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_the_batch_locustfile_runs_batches_to_their_end(server, tmp_path):
    done = subprocess.run(
        [str(LOCUST), "-f", "loadtest/batch_locustfile.py", "--headless", "--host", server.url, "-u", "1", "-r", "1",
         "-t", "5s", "--stop-timeout", "60", "--csv", str(tmp_path / "load"), "--only-summary"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "T2I_LOAD_LINES": "3", "T2I_LOAD_STEPS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader((tmp_path / "load_stats.csv").open())}
    assert int(rows["batch [3 lines]"]["Request Count"]) >= 1 and int(rows["/v1/files/{id}/content"]["Request Count"])
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_pipeline_modes_bench_runs_sd15_architecture_on_cpu_at_small_size(tmp_path):
    model = tmp_path / "sd15-random"
    built = subprocess.run([sys.executable, "-m", "t2i_task.generation.tiny_model", "--architecture", "sd15", str(model)],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    unet = json.loads((model / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768

    done = subprocess.run(
        [sys.executable, "bench/pipeline_modes.py", "--model", str(model), "--size", "64", "--steps", "2",
         "--batches", "1", "--modes", "sdpa", "xformers", "--rounds", "1", "--results", str(tmp_path / "m.json")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    sdpa = next(row for row in rows if row["mode"] == "sdpa")
    assert sdpa["it_per_s"] > 0 and sdpa["images_per_s"] > 0
    xformers = next(row for row in rows if row["mode"] == "xformers")
    assert "it_per_s" in xformers or "needs CUDA" in xformers["unavailable"]


def test_the_key_fairness_bench_runs_and_prints_its_table():
    done = subprocess.run([sys.executable, "bench/key_fairness.py", "--jobs", "4", "--rounds", "1"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "idle server:" in done.stdout and "behind A's 4 queued jobs:" in done.stdout
