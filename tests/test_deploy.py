"""Shipped deployment files: the Kubernetes manifests, the Dockerfile and the examples."""

from __future__ import annotations

import re

import pytest
import yaml

from proxy.core.settings import ENV_ALIASES, load_settings
from proxy.web.openapi import PATHS
from tests.support import REPO

MANIFESTS = sorted((REPO / "config" / "k8s").glob("*.yaml"))


def _containers(docs):
    for doc in docs:
        if doc and doc.get("kind") == "Deployment":
            yield doc, [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "sovereign"][0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_parse_and_wire_probes_env_and_secrets(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Secret"} <= kinds
    (deployment, container), = list(_containers(docs))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= set(PATHS)
    env = {e["name"]: e for e in container["env"]}
    known = set(ENV_ALIASES) | {"SOVEREIGN_SERVER__DRAIN_SECONDS", "SOVEREIGN_STORE__SPOOL_DIR"}
    assert set(env) <= known
    for secret in ("SOVEREIGN_UPSTREAM_API_KEY", "SOVEREIGN_ADMIN_TOKEN"):
        assert "secretKeyRef" in env[secret]["valueFrom"]
    assert container["resources"]["limits"] and container["resources"]["requests"]
    drain = float(env["SOVEREIGN_SERVER__DRAIN_SECONDS"]["value"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    # The env the manifest sets must be a valid configuration.
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    settings = load_settings(env={**values, "SOVEREIGN_UPSTREAM_API_KEY": "x", "SOVEREIGN_ADMIN_TOKEN": "y"})
    # The settlement spool is on a volume of its own (the root filesystem is read-only).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert settings.store.spool_dir in mounts and mounts[settings.store.spool_dir] in volumes


def test_fleet_has_service_and_disruption_budget():
    docs = list(yaml.safe_load_all((REPO / "config" / "k8s" / "fleet.yaml").read_text()))
    kinds = [doc["kind"] for doc in docs]
    assert "Service" in kinds and "PodDisruptionBudget" in kinds
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] >= 2


def test_sidecar_app_talks_to_loopback():
    docs = list(yaml.safe_load_all((REPO / "config" / "k8s" / "sidecar.yaml").read_text()))
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    app = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "app")
    assert {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"} in app["env"]


def test_dockerfile_is_pinned_multi_stage_non_root():
    text = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(bases) == 2 and all(re.search(r":\d+\.\d+\.\d+-slim", b) for b in bases)
    final = text.split("FROM ")[-1]
    assert "USER 10001" in final and "STOPSIGNAL SIGTERM" in final and "HEALTHCHECK" in final
    assert "gcc" not in final  # build tools stay in the build stage
    assert 'ENTRYPOINT ["sovereign"]' in final and 'CMD ["serve"]' in final
    assert (REPO / ".dockerignore").read_text().count(".venv") == 1


@pytest.mark.parametrize("path", sorted((REPO / "config" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_settings(path, env={})
