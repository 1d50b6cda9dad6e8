"""Start the real server (`bentoml serve` in a subprocess) on a free loopback port: for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from t2i_task.config import DEFAULT_CONFIG_PATH

PROJECT_ROOT = DEFAULT_CONFIG_PATH.parent
BENTOML = Path(sys.executable).with_name("bentoml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, model_path: Path, base: Path = DEFAULT_CONFIG_PATH, **overrides) -> Path:
    """The `base` configuration with the given model, a fresh database and images folder in `folder`."""
    config = yaml.safe_load(base.read_text())
    config["model"]["path"] = str(model_path)
    config["storage"] = {"database_url": f"sqlite:///{folder / 't2i.db'}", "images_dir": str(folder / "images")}
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path = folder / "configuration.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    config: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(config: Path, timeout: float = 90) -> Server:
    port = free_port()
    log = config.with_name("server.log")
    env = {
        **os.environ,
        "T2I_CONFIG": str(config),
        "BENTOML_HOME": str(config.parent / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    env.pop("T2I_DATABASE_URL", None)
    env.pop("T2I_IMAGES_DIR", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BENTOML), "serve", "service:TextToImageService", "--host", "127.0.0.1", "--port", str(port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the workers too
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")
