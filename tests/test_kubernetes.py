"""deploy/kubernetes/ agrees with the server it deploys: ports, probes, signals, settings, metrics.

The manifests are not applied here (no cluster); they are read and checked against the
server's own settings, so that a renamed variable or a longer drain breaks this test rather
than a deployment.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer

from t2i_task.api.guards import OPEN_PATHS
from t2i_task.config.settings import ENV_OVERRIDES, ServingConfig

MANIFESTS = Path(__file__).parents[1] / "deploy" / "kubernetes"
SERVICE = Path(__file__).parents[1] / "service.py"
# What the object-store client reads (t2i_task/storage/files.py) besides the server's own variables.
STANDARD_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ALLOW_HTTP"}


@pytest.fixture(scope="module")
def documents() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"] if "metadata" in document else path.name)] = document
    return found


@pytest.fixture(scope="module")
def server(documents) -> dict:
    """The server's pod template."""
    return documents[("Deployment", "t2i")]["spec"]["template"]


def container(pod: dict) -> dict:
    [server] = [c for c in pod["spec"]["containers"] if c["name"] == "t2i"]
    return server


def test_kustomize_applies_every_manifest_and_only_those():
    listed = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_container_serves_on_bentomls_port_and_the_service_reaches_it(documents, server):
    [port] = container(server)["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get()
    service = documents[("Service", "t2i")]["spec"]
    assert service["selector"].items() <= server["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == port["name"]
    assert server["metadata"]["annotations"]["prometheus.io/port"] == str(port["containerPort"])


def test_probes_use_the_routes_the_server_answers_without_a_key(server):
    probes = container(server)
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"  # ready once the default model is loaded
    assert probes["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"/readyz", "/livez"} <= OPEN_PATHS, "probes carry no API key"


def test_the_grace_period_covers_the_drain(server):
    spec = server["spec"]
    env = {item["name"]: item.get("value") for item in container(server)["env"]}
    drain_s = ServingConfig.model_fields["drain_timeout_s"].default
    pause_s = container(server)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= pause_s + drain_s + 10, "running work finishes or is released"
    assert float(env["T2I_LEASE_S"]) == ServingConfig.model_fields["lease_s"].default


def test_every_variable_set_is_one_the_server_reads(documents, server):
    known = {variable for _, _, variable, _ in ENV_OVERRIDES} | STANDARD_ENV
    env = container(server)["env"]
    assert {item["name"] for item in env} <= known
    # Each replica is named after its pod: its own queue, and its own work back after a restart.
    [name] = [item for item in env if item["name"] == "T2I_INSTANCE_NAME"]
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    [source] = container(server)["envFrom"]
    secret = documents[("Secret", source["secretRef"]["name"])]["stringData"]
    server_keys = {key for key in secret if not key.startswith("POSTGRES_")}  # the database's own
    assert server_keys <= known and {"T2I_DATABASE_URL", "T2I_IMAGES_DIR"} <= server_keys
    assert secret["T2I_IMAGES_DIR"].startswith("s3://"), "replicas on several nodes share a bucket"
    assert secret["T2I_DATABASE_URL"].startswith("postgresql"), "and one PostgreSQL"


def test_autoscaling_queries_the_gauge_the_server_exports(documents):
    [trigger] = documents[("ScaledObject", "t2i")]["spec"]["triggers"]
    metric = re.match(r"max\((\w+)\{", trigger["metadata"]["query"])[1]
    assert f'name="{metric}"' in SERVICE.read_text()
    assert documents[("ScaledObject", "t2i")]["spec"]["scaleTargetRef"]["name"] == "t2i"
