"""The Helm chart renders and lints with each values file, and its manifests are valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint

from pipeline.settings import Settings

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "event-pipeline"
ALERTS = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
KUBERNETES = "1.31.0"
CUSTOM = {"ServiceMonitor", "PrometheusRule", "RayCluster", "ScaledObject"}


def _render(values_file: str | None) -> list[dict[str, Any]]:
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
    rendered = Chart.load(CHART).render(values, name="pl", namespace="pipeline")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values_file", [None, "values-dev.yaml", "values-prod.yaml"])
def test_the_chart_lints_and_every_manifest_validates(values_file: str | None) -> None:
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
    report = lint(CHART, values, strict=True)
    assert report["errors"] == [], report
    manifests = _render(values_file)
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "PodDisruptionBudget", "Service"} <= kinds
    for manifest in manifests:
        if manifest["kind"] in CUSTOM:
            assert manifest["apiVersion"] and manifest["spec"], manifest
            continue
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_production_values_bring_the_operators_resources() -> None:
    kinds = {m["kind"] for m in _render("values-prod.yaml")}
    assert kinds >= CUSTOM
    assert not CUSTOM & {m["kind"] for m in _render(None)}


def test_probes_and_ports_are_the_processes_own() -> None:
    settings = Settings(_env_file=None)
    ports = {
        "worker": settings.metrics_port,
        "projections": settings.projections_metrics_port,
        "api": settings.api_port,
    }
    fields = {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}
    deployments = [m for m in _render("values-prod.yaml") if m["kind"] == "Deployment"]
    assert len(deployments) == 3
    for deployment in deployments:
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        [port] = container["ports"]
        assert port["containerPort"] == ports[component]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
        names = {e["name"] for e in container["env"]}
        assert names <= fields, names - fields
        assert not any(
            "value" in e and "PASSWORD" in e["name"] and not e["name"].endswith("_FILE")
            for e in container["env"]
        ), "secrets are mounted, never inlined"


def test_the_chart_alert_rules_are_the_shipped_ones() -> None:
    [rule] = [m for m in _render("values-prod.yaml") if m["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
