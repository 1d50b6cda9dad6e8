"""Shared fixtures: the offline model, and a store on each supported database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from t2i_task.generation.tiny_model import write_tiny_model
from t2i_task.local_server import start_server, write_config
from t2i_task.storage.store import Store
from tests.browser import chromium
from tests.gate import Gate

POSTGRES_URL = os.environ.get("T2I_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """The offline model, built once per test run through the project's own command."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def postgres_admin_engine():
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        message = f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc.orig}"
        if os.environ.get("T2I_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (T2I_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    yield engine
    engine.dispose()


@contextmanager
def postgres_schema(admin) -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a schema of their own, dropped afterwards."""
    schema = f"t2i_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def postgres_url(postgres_admin_engine):
    with postgres_schema(postgres_admin_engine) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database_url, tmp_path):
    store = Store(database_url, tmp_path / "images")
    yield store
    store.close()


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def gate(server_folder) -> Gate:
    """Holds the `server` fixture's generations while a test arranges its requests (tests/gate.py)."""
    return Gate(server_folder)


@pytest.fixture(scope="module")
def server_config() -> dict:
    """Configuration sections a test module changes for its `server` (a module overrides this fixture)."""
    return {}


@pytest.fixture(scope="module")
def server_env() -> dict:
    """Environment variables a test module sets for its `server`, e.g. the test hooks' (tests/gate.py)."""
    return {}


@pytest.fixture(scope="module")
def server(tiny_model_path, server_folder, gate, server_config, server_env):
    """The real server (`bentoml serve`) on a free loopback port, with its own database and images folder."""
    server = start_server(write_config(server_folder, tiny_model_path, **server_config), env=gate.env(**server_env))
    yield server
    server.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture
def client(server):
    """The stock `openai` client, pointed at the server."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (tests/browser.py), one per test module: Playwright's sync
    API keeps an event loop running while it is open, which would stop later modules' asyncio tests."""
    with chromium() as browser:
        yield browser
