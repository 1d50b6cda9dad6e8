"""`make test-dashai`: one generation through a real DashAI 0.10.0 with this plugin, against this server.

Run with the project's .venv (it starts this server with t2i_task.local_server):

    .venv/bin/python integrations/dashai/e2e.py [--venv .venv-dashai]

1. DashAI's own environment (`--venv`), made only if missing (its `.installed`
   stamp): torch 2.14.1 and torchvision 0.29.1 first (the pair that installs and
   imports together on these machines), then dashai==0.10.0. The plugin is
   reinstalled from integrations/dashai on every run, so the copy under test is
   the working tree's.
2. This server, the shipped configuration and demo model, on a free port with a
   database and images in a temporary folder.
3. DashAI (`dashai --local-path <temp dir> --no-browser`, port 8000) with
   T2I_SERVER_URL pointing at this server.
4. Through DashAI's REST API, with the bodies its own front end sends: the
   plugin's model is listed as ready, a session with it (the form's values), a
   process with a prompt, `POST /api/v1/job/` (GenerativeJob), polling until
   status 3, the picture from `/api/v1/generative-process/file/{name}`.
5. DashAI's own front end (its `/app/`) in Chromium, the same walk as the suite's
   against this server (tests/dashai_walk.py) with the plugin's model: a session,
   two prompts and their pictures, a parameter UPDATE, rename, delete; no error
   toast, no field in red, no console error but DashAI's own.
6. This server stopped, DashAI's next process must end in status 4 with
   "Error details: " and the server's address in its output.

Prints a summary with timings; exits 1 on any failure. Stops DashAI and the
server and removes the temporary folders in all cases.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from t2i_task.local_server import Server, start_server, write_config
from tests.browser import SCREENSHOTS, chromium
from tests.dashai_walk import walk_generative_chat

PLUGIN_DIR = ROOT / "integrations" / "dashai"
DASHAI = "http://127.0.0.1:8000"  # DashAI's port is fixed
TASK = "TextToImageGenerationTask"
MODEL = "InferenceServerModel"  # the component name DashAI registers: the plugin class's name
PROMPT = "a red circle on a blue background"
FORM = {"num_inference_steps": 10, "guidance_scale": 3.0, "width": 64, "height": 64, "seed": 42}
POLL_S = 1.5  # DashAI's front end polls a process this often
FINISHED, ERROR = 3, 4
PIP = ["-m", "pip", "install", "--disable-pip-version-check", "--quiet"]


class Failed(Exception):
    """A check that did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def say(message: str) -> None:
    print(f"[test-dashai] {message}", flush=True)


# DashAI's environment

def dashai_environment(venv: Path, python: str) -> float | None:
    """Make DashAI's venv if it is missing (seconds it took; None if it was there), then reinstall the plugin."""
    stamp = venv / ".installed"
    took = None
    if not stamp.exists():
        say(f"installing DashAI 0.10.0 into {venv} (several GB, a few minutes)")
        started = time.monotonic()
        if not (venv / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
        # torch first, pinned: unpinned, DashAI's `torch`/`torchvision` would take builds that do not
        # import together here (PyPI's torchvision beside the local torch 2.13.0 wheel).
        subprocess.run([str(venv / "bin" / "python"), *PIP, "torch==2.14.1", "torchvision==0.29.1"], check=True)
        subprocess.run([str(venv / "bin" / "python"), *PIP, "dashai==0.10.0"], check=True)
        took = time.monotonic() - started
        stamp.write_text(f"installed in {took:.0f} s\n")
    # The working tree's plugin, not an older copy: no dependencies to fetch (DashAI has httpx and pillow).
    subprocess.run([str(venv / "bin" / "python"), *PIP, "--no-deps", "--force-reinstall", str(PLUGIN_DIR)],
                   check=True)
    return took


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# DashAI itself

class DashAI:
    def __init__(self, venv: Path, local_path: Path, server_url: str) -> None:
        self.local_path = local_path
        self.log = local_path.parent / "dashai.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("T2I_")}
        env.update(T2I_SERVER_URL=server_url, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(venv / "bin" / "dashai"), "--local-path", str(local_path), "--no-browser"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=f"{DASHAI}/api", timeout=60)
        self._family: dict[int, psutil.Process] = {}

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._remember_family()
            if self.process.poll() is not None:
                raise Failed(f"DashAI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.http.get("/v1/component/", params={"select_types": "GenerativeTask"},
                                 timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise Failed(f"DashAI did not answer on {DASHAI} within {timeout:g} s:\n{self.log_tail()}")

    def _remember_family(self) -> None:
        """DashAI, its Huey consumer and the consumer's worker (spawned): stopped by their ids at the end."""
        try:
            root = psutil.Process(self.process.pid)
            for process in [root, *root.children(recursive=True)]:
                self._family.setdefault(process.pid, process)
        except psutil.NoSuchProcess:
            pass

    def stored_output(self, process_id: int) -> list[str]:
        """A process's output rows as DashAI's database holds them (its API shows them changed)."""
        with closing(sqlite3.connect(f"file:{self.local_path / 'db.sqlite'}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT data FROM process_data WHERE process_id = ? AND NOT is_input ORDER BY id",
                              (process_id,)).fetchall()
        return [data for (data,) in rows]

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        self._remember_family()
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # uvicorn's Ctrl-C: DashAI then terminates its consumer
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        family = list(self._family.values())
        for process in family:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=10)
        for process in alive:
            process.kill()
        self.process.wait()


# DashAI's front end, call for call

def front_end_form(component: dict, name: str) -> dict:
    """The session form's initial values as DashAI's front end builds them (CreateSessionContext.jsx):
    every schema property's `placeholder` (an Optional field's from its first `anyOf` member), or ""."""
    values = {"name": name, "description": ""}
    for key, prop in component["schema"]["properties"].items():
        if "anyOf" in prop and len(prop["anyOf"]) == 2 and prop["anyOf"][1].get("type") == "null":
            prop = prop["anyOf"][0]
        values[key] = prop.get("placeholder", "")
    return values


def create_session(ui: httpx.Client, component: dict, form: dict) -> dict:
    name = "TextToImageGenerationTask_Session_1"
    parameters = {**front_end_form(component, name), **form}
    body = {"name": name, "description": "", "task_name": TASK, "model_name": component["name"],
            "parameters": parameters}
    response = ui.post("/v1/generative-session/", json=body)
    check(response.status_code == 201, f"session create: {response.status_code} {response.text}")
    return response.json()


def ask(ui: httpx.Client, session_id: int, prompt: str, timeout: float) -> dict:
    """A chat message: the process (multipart), its GenerativeJob, then polling until status 3 or 4."""
    created = ui.post("/v1/generative-process/", files={"session_id": (None, str(session_id)),
                                                         "text_0": (None, prompt)})
    check(created.status_code == 201, f"process create: {created.status_code} {created.text}")
    process = created.json()
    job = ui.post("/v1/job/", files={"job_type": (None, "GenerativeJob"),
                                     "kwargs": (None, json.dumps({"generative_process_id": process["id"]}))})
    check(job.status_code == 201 and "id" in job.json(), f"job enqueue: {job.status_code} {job.text}")
    deadline = time.monotonic() + timeout
    while process["status"] not in (FINISHED, ERROR):
        check(time.monotonic() < deadline, f"process {process['id']} still in status {process['status']} "
                                           f"after {timeout:g} s")
        time.sleep(POLL_S)
        response = ui.get(f"/v1/generative-process/{process['id']}")
        check(response.status_code == 200, f"process poll: {response.status_code} {response.text}")
        process = response.json()
    return process


def colour_shares(image: Image.Image) -> tuple[float, float]:
    """Shares of clearly blue and clearly red pixels."""
    data = image.convert("RGB").tobytes()
    pixels = [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]
    blue = sum(b > 100 and b > r + 40 and b > g + 40 for r, g, b in pixels)
    red = sum(r > 100 and r > g + 40 and r > b + 40 for r, g, b in pixels)
    return blue / len(pixels), red / len(pixels)


def run(args: argparse.Namespace) -> dict:
    timings: dict = {}
    facts: dict = {}
    timings["dashai_install_s"] = dashai_environment(args.venv, args.python)
    measure = args.measure_venv or timings["dashai_install_s"] is not None
    facts["venv_bytes"] = folder_size(args.venv) if measure else None

    with socket.socket() as probe:
        check(probe.connect_ex(("127.0.0.1", 8000)) != 0,
              "port 8000 is taken: DashAI always serves there; stop whatever holds it")

    work = Path(tempfile.mkdtemp(prefix="t2i-dashai-e2e-"))
    server: Server | None = None
    dashai: DashAI | None = None
    try:
        (work / "server").mkdir()
        server = start_server(write_config(work / "server"), timeout=180)
        facts["server_url"] = server.url
        say(f"this server: {server.url} (shipped configuration, demo model)")

        started = time.monotonic()
        dashai = DashAI(args.venv, work / "dashai", server.url)
        dashai.wait_ready()
        timings["dashai_start_s"] = time.monotonic() - started
        say(f"DashAI answers on {DASHAI} after {timings['dashai_start_s']:.1f} s")
        ui = dashai.http

        # The generative chat's model gallery: the plugin's model, ready without a download.
        tasks = ui.get("/v1/component/", params={"select_types": "GenerativeTask"}).json()
        check(TASK in [task["name"] for task in tasks], f"DashAI lists no {TASK}: {[t['name'] for t in tasks]}")
        models = ui.get("/v1/component/", params={"related_component": TASK}).json()
        [component] = [m for m in models if m["name"] == MODEL] or [None]
        check(component is not None, f"DashAI does not list {MODEL} for {TASK}: {[m['name'] for m in models]}")
        check(component.get("downloaded") is True and component["metadata"].get("requires_download") is False,
              f"{MODEL} is not listed as ready: downloaded={component.get('downloaded')}, "
              f"metadata={component.get('metadata')}")
        properties = component["schema"]["properties"]
        check(properties["server_url"].get("placeholder") == server.url,
              f"the form's server_url is {properties['server_url'].get('placeholder')!r}, not T2I_SERVER_URL")
        facts["form"] = {key: prop.get("placeholder", prop.get("anyOf", [{}])[0].get("placeholder"))
                         for key, prop in properties.items()}
        facts["display_name"] = component.get("display_name")
        say(f"DashAI lists {MODEL} ({facts['display_name']!r}) as downloaded; form {facts['form']}")

        session = create_session(ui, component, FORM)
        say(f"session {session['id']}: parameters {session['parameters']}")

        started = time.monotonic()
        process = ask(ui, session["id"], PROMPT, args.timeout)
        timings["generation_s"] = time.monotonic() - started
        check(process["status"] == FINISHED, f"process {process['id']} ended in status {process['status']}: "
                                             f"{process['output']}\n{dashai.log_tail()}")
        [row] = process["output"]
        check(row["data_type"] == "Image", f"output row {row}")
        picture = ui.get(f"/v1/generative-process/file/{row['data']}")
        check(picture.status_code == 200, f"file {row['data']}: {picture.status_code} {picture.text[:300]}")
        check(picture.headers["content-type"] == "image/png", f"content type {picture.headers['content-type']}")
        image = Image.open(io.BytesIO(picture.content))
        check(image.format == "PNG" and image.size == (FORM["width"], FORM["height"]),
              f"picture {image.format} {image.size}")
        blue, red = colour_shares(image)
        facts["picture"] = f"{row['data']}: PNG {image.size[0]}x{image.size[1]}, {blue:.0%} blue, {red:.0%} red"
        check(blue >= 0.4 and red >= 0.03, f"not a red shape on blue: {facts['picture']}")
        if args.keep_picture:
            args.keep_picture.write_bytes(picture.content)
        say(f"process {process['id']} finished in {timings['generation_s']:.1f} s: {facts['picture']}")

        # DashAI's own front end in a browser, the plugin's model picked in its gallery: the same walk
        # as tests/test_dashai_frontend.py's against this server's /app/.
        started = time.monotonic()
        with chromium() as browser:
            walk = walk_generative_chat(browser, f"{DASHAI}/app/", task="Text to Image", model=facts["display_name"],
                                        screenshots=SCREENSHOTS / "dashai-plugin", name_prefix="plugin")
        timings["ui_walk_s"] = time.monotonic() - started
        check(not walk.problems, "DashAI's UI with the plugin: " + "; ".join(walk.problems))
        say(f"DashAI's UI walked in Chromium in {timings['ui_walk_s']:.1f} s (steps at {walk.timings}), no error "
            f"toast, no field in red; screenshots in {SCREENSHOTS / 'dashai-plugin'}")

        # The server gone: DashAI's next process ends in ERROR, naming the address.
        server_url = server.url
        server.stop()
        server = None
        started = time.monotonic()
        failed = ask(ui, session["id"], PROMPT, args.timeout)
        timings["error_s"] = time.monotonic() - started
        check(failed["status"] == ERROR, f"with the server stopped, process {failed['id']} ended in status "
                                         f"{failed['status']}: {failed['output']}")
        # What DashAI stored and what its API answers (its chat shows that): "Error details: <the
        # plugin's message>", whole. DashAI passes output rows through os.path.basename, so the
        # plugin keeps "/" out of its messages (dashai_t2i_server/client.py, ServerError).
        address = server_url.split("://", 1)[1]  # host:port: how the plugin names the server
        expected = f"Error details: Cannot reach the inference server at {address} "
        [stored] = dashai.stored_output(failed["id"])
        shown = failed["output"][0]["data"] if failed["output"] else ""
        facts["error_stored"], facts["error_shown"] = stored, shown
        check(stored.startswith(expected), f"DashAI stored {stored!r}, not {expected!r}...")
        check(shown == stored, f"DashAI answers {shown!r} for the stored {stored!r}: the message was cut")
        say(f"server stopped: process {failed['id']} ended in status 4 after {timings['error_s']:.1f} s")
        say(f"  DashAI stored: {stored}")
        say(f"  DashAI shows:  {shown}")
        return {"timings": timings, "facts": facts}
    except Exception:
        if dashai is not None:
            say(f"DashAI's log (last lines):\n{dashai.log_tail()}")
        raise
    finally:
        if dashai is not None:
            dashai.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-dashai", help="DashAI's own environment")
    parser.add_argument("--python", default=shutil.which("python3") or sys.executable,
                        help="the Python that makes that environment (3.11: torch's wheels lie on disk for it)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one DashAI process may take")
    parser.add_argument("--measure-venv", action="store_true", help="report the venv's size even when it was there")
    parser.add_argument("--keep-picture", type=Path, help="save the picture DashAI served here")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        result = run(args)
    except (Failed, subprocess.CalledProcessError, RuntimeError) as exc:
        say(f"FAILED after {time.monotonic() - started:.0f} s: {exc}")
        return 1
    timings, facts = result["timings"], result["facts"]
    install = timings["dashai_install_s"]
    lines = [
        "DashAI 0.10.0 end to end with the plugin: PASSED",
        f"  DashAI install:          {'already installed' if install is None else f'{install:.0f} s'}"
        + (f", venv {facts['venv_bytes'] / 1e9:.1f} GB" if facts["venv_bytes"] else ""),
        f"  DashAI start:            {timings['dashai_start_s']:.1f} s (until its API answers)",
        f"  generation via DashAI:   {timings['generation_s']:.1f} s (process, job, polling every {POLL_S} s)",
        f"  picture:                 {facts['picture']}",
        f"  DashAI's UI in Chromium: {timings['ui_walk_s']:.1f} s (session, 2 prompts, UPDATE, rename, delete;"
        " no error toast, no field in red)",
        f"  server stopped:          status 4 in {timings['error_s']:.1f} s",
        f"    DashAI stored:         {facts['error_stored']}",
        f"    DashAI shows:          {facts['error_shown']}",
        f"  total:                   {time.monotonic() - started:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
