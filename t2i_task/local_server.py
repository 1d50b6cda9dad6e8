"""Start the real server (`bentoml serve` in a subprocess) on a free loopback port: for tests and benchmarks."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from t2i_task.config.settings import DEFAULT_CONFIG_PATH, load_settings

PROJECT_ROOT = DEFAULT_CONFIG_PATH.parent
BENTOML = Path(sys.executable).with_name("bentoml")


# Ports handed out below the kernel's ephemeral range (32768-60999 on Linux): the
# kernel never gives one of these to another socket by itself (a client's
# outgoing connection, another `bind(0)`), so a port found free stays free until
# the server binds it. Each is handed out once per process.
PORT_RANGE = (20_000, 32_767)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and that this process has not handed out before."""
    while True:
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken by another program
        return port


def write_config(folder: Path, model_path: Path | None = None, base: Path = DEFAULT_CONFIG_PATH, **overrides) -> Path:
    """The `base` configuration with a fresh database and images folder in `folder`.

    `model_path` swaps the base's models for that one, served under its folder's name;
    `overrides` update whole sections, e.g. `serving={"max_attempts": 1}`; `model={...}` updates
    the default model's entry, and `models=[...]` (a registry) replaces the models.
    """
    config = yaml.safe_load(base.read_text())
    entries = config["models"] if "models" in config else [config["model"]]
    if model_path is None:
        # Keep the base's models; relative paths are relative to the base file, not to `folder`.
        resolved = {model.name: model.entry for model in load_settings(base).served_models}
        for entry in entries:
            entry["path"] = resolved[entry["name"]].path
            if resolved[entry["name"]].loras_dir:
                entry["loras_dir"] = resolved[entry["name"]].loras_dir
    else:
        # What the base says of its default model's drawing (sizes, names, defaults) is not this model's.
        default = next(entry for entry in entries if entry["name"] == config.get("default_model", entries[0]["name"]))
        kept = {key: value for key, value in default.items()
                if key not in ("sizes", "aliases", "defaults", "limits", "preload", "loras_dir")}
        for key in ("models", "default_model"):
            config.pop(key, None)
        config["model"] = kept | {"name": Path(model_path).name, "path": str(model_path)}
    config["storage"] = {"database_url": f"sqlite:///{folder / 't2i.db'}", "images_dir": str(folder / "images")}
    for section, values in overrides.items():
        if section == "model" and "models" in config:
            name = config.get("default_model", config["models"][0]["name"])
            next(entry for entry in config["models"] if entry["name"] == name).update(values)
        elif isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
            if section == "models":
                config.pop("model", None)
    path = folder / "configuration.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    config: Path

    def _processes(self) -> list[psutil.Process]:
        """The server and its workers, which BentoML starts in sessions of their own
        (a signal to the server's process group does not reach them)."""
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the server (it drains and stops its workers); SIGKILL to whatever is left after `timeout`."""
        processes = self._processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            process.kill()
        self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to every process of the server at once: a crash, nothing drains."""
        for process in self._processes():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()


class PortTaken(RuntimeError):
    """Another program bound the server's port first."""


def start_server(config: Path, timeout: float = 90, env: dict[str, str] | None = None,
                 log_name: str = "server.log") -> Server:
    """`bentoml serve` with `config` on a free loopback port, returned once /readyz answers 200.

    Another program may still take the port between the check and the server's
    bind: the server then exits at once saying so, and starts again on another port.
    """
    for _ in range(3):
        try:
            return _start_server_on(free_port(), config, timeout, env, log_name)
        except PortTaken:
            continue
    raise RuntimeError("three free ports were taken before the server could bind them")


def _start_server_on(port: int, config: Path, timeout: float, env: dict[str, str] | None, log_name: str) -> Server:
    log = config.with_name(log_name)
    logged_before = log.stat().st_size if log.exists() else 0
    base = {key: value for key, value in os.environ.items() if not key.startswith("T2I_")}
    env = {
        **base,
        "T2I_CONFIG": str(config),
        "BENTOML_HOME": str(config.parent / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        **(env or {}),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(BENTOML), "serve", "service:TextToImageService", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals from the terminal running the tests stay out
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_bytes()[logged_before:].decode(errors="replace")
            if "Address already in use" in output:
                raise PortTaken(port)
            raise RuntimeError(f"server exited with {process.returncode}:\n{output[-4000:]}")
        try:
            # Still running: a 200 from a program that took the port first is not ours.
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200 and process.poll() is None:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def start_s3_server(log: Path, bucket: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server (from the dev extra) on a free port, with `bucket` made: the server and the
    standard AWS environment that points a client at it. Terminate the server when done."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.put(f"{url}/{bucket}").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.terminate()
            raise RuntimeError(f"moto's S3 server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return server, {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
