"""Fuzzing every endpoint from the server's own OpenAPI schema: no 5xx, no hang, 4xx errors in JSON."""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from t2i_task.local_server import start_server, write_config

# Small limits, so that the valid requests the fuzzer finds generate in milliseconds.
EXAMPLES_PER_OPERATION = int(os.environ.get("T2I_FUZZ_EXAMPLES", "40"))
# `make fuzz` draws new examples each run (T2I_FUZZ_RANDOM=1); `make test` always sends the same ones.
FIXED_EXAMPLES = os.environ.get("T2I_FUZZ_RANDOM") != "1"
FAST_LIMITS = {"limits": {"max_width": 64, "max_height": 64, "max_steps": 2, "max_images_per_request": 2},
               "defaults": {"num_inference_steps": 1}}


FUZZ_KEY = "fuzz-user-key"


@pytest.fixture
def fuzz_server(tiny_model_path, tmp_path, database_url):
    """A server on each database: PostgreSQL refuses inputs SQLite takes (NUL, 64-bit ids). The one on
    SQLite requires keys (the fuzzer sends a user's), so every route is also fuzzed with an owner's scope."""
    env = {"T2I_DATABASE_URL": database_url}
    if database_url.startswith("sqlite"):
        env["T2I_API_KEYS"] = f"fuzzer:{FUZZ_KEY}"
    server = start_server(write_config(tmp_path, tiny_model_path, **FAST_LIMITS), env=env)
    server.headers = {"Authorization": f"Bearer {FUZZ_KEY}"} if "T2I_API_KEYS" in env else {}
    yield server
    server.stop()


# uvicorn's HTTP parser (h11) refuses a request whose head it has buffered past 16 KiB before
# the app sees it, with a plain-text 400: a fuzzed query string of thousands of characters can be
# one, depending on how the bytes arrive. Such a request gets that 400, never an answer of ours.
HTTP_PARSER_LIMIT = 16 * 1024


def parser_refusal(response) -> bool:
    return (response.status_code == 400 and len(response.request.url) > HTTP_PARSER_LIMIT
            and response.text == "Invalid HTTP request received.")


def check_response(case, response) -> None:
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and not parser_refusal(response):
        content_type = response.headers.get("content-type") or ""
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/json"), (
            f"{case.method} {case.path} {case.path_parameters} {case.query}: {response.status_code} "
            f"{content_type} {response.text[:200]!r}"
        )
        body = response.json()
        message = body["error"]["message"] if case.path.startswith("/v1/") else body["detail"]
        assert message, f"{case.method} {case.path}: an error without a message"


def test_no_fuzzed_request_gets_a_server_error(fuzz_server):
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")  # public: the API reference reads it
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12, "every route is in the schema"
    sent = 0

    for operation, mode in ((op, mode) for op in operations for mode in GenerationMode):
        # Positive cases are valid by the schema (they reach the model); negative ones break it.
        @given(case=operation.as_strategy(generation_mode=mode))
        # derandomize: the same examples every run, so a red run means a change broke something,
        # not that this run happened to draw a new case (explore with `make fuzz`).
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=FIXED_EXAMPLES)
        def fuzz(case):
            nonlocal sent
            sent += 1
            check_response(case, case.call(timeout=30, headers=fuzz_server.headers))  # a hang fails here

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid form
    print(f"fuzzed {sent} requests over {len(operations)} operations, valid and invalid")
    assert sent >= len(operations) * 20
