"""Run the whole suite several times on a fresh clone and say which runs passed.

    python3 tests/repeat_suite.py 5                  # make test-repeat N=5
    python3 tests/repeat_suite.py 3 --busy-cores 2   # make test-repeat N=3 BUSY=2

Clones the committed HEAD into a temporary folder, then runs CI's own command
(`bash .ci/run`, i.e. `make test`) there N times in a row; the first run also
creates the clone's .venv. `--busy-cores K` keeps K busy-looping processes
running for the whole time, as a loaded machine would. Prints, for each run,
its counts, wall time and the tests that failed, then how many runs passed.
Standard library only: it runs before any install.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def outcome(report: Path) -> dict:
    """Counts and failed test ids from one run's JUnit XML report."""
    if not report.exists():
        return {"tests": 0, "failed": [], "skipped": 0}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed, skipped = [], 0
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            skipped += 1
    return {"tests": int(suite.get("tests", 0)), "failed": failed, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=int, help="how many times to run the suite")
    parser.add_argument("--busy-cores", type=int, default=0, help="busy-looping processes kept running meanwhile")
    parser.add_argument("--keep", action="store_true", help="keep the clone and the run logs")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="t2i-repeat-"))
    clone = folder / "clone"
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                            check=True).stdout.strip()
    print(f"fresh clone of {commit} in {clone}; {args.runs} runs of `bash .ci/run`, "
          f"{args.busy_cores} busy cores, {os.cpu_count()} cores here", flush=True)

    loops = busy_loops(args.busy_cores)
    results = []
    try:
        for run in range(1, args.runs + 1):
            report, log = folder / f"run-{run}.xml", folder / f"run-{run}.log"
            env = {**os.environ, "PYTEST_ADDOPTS": f"--junitxml={report}"}
            started = time.monotonic()
            with log.open("w") as out:
                code = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL).returncode
            seconds = time.monotonic() - started
            result = {"run": run, "exit": code, "seconds": seconds, **outcome(report)}
            results.append(result)
            passed = result["tests"] - len(result["failed"]) - result["skipped"]
            print(f"run {run}: exit {code}, {passed} passed, {len(result['failed'])} failed, "
                  f"{result['skipped']} skipped, {seconds:.0f} s", flush=True)
            for test in result["failed"]:
                print(f"  failed: {test}", flush=True)
            if result["tests"] == 0:
                print(f"  no report: see {log}", flush=True)
    finally:
        for loop in loops:
            loop.kill()

    green = sum(result["exit"] == 0 for result in results)
    print(f"{green} of {len(results)} runs passed ({args.busy_cores} busy cores, commit {commit})")
    if args.keep or green < len(results):
        print(f"logs and reports kept in {folder}")
    else:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    return 0 if green == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
