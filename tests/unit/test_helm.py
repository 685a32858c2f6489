"""The Helm chart renders and lints with each values file, and its manifests are valid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint

from pipeline.ops.supervisor import metrics_ports
from pipeline.settings import Settings

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "event-pipeline"
ALERTS = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
KUBERNETES = "1.31.0"
CUSTOM = {"ServiceMonitor", "PrometheusRule", "RayCluster", "ScaledObject"}
CRDS = Path(__file__).parents[1] / "crds"
"""The custom resources' schemas: the operators' CRDs as kubernetes-models publishes them
(npm; `npm ci --prefix tests/crds`), and RayCluster's written from KubeRay's reference."""


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
        if manifest["kind"] not in CUSTOM:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    _validate_custom([m for m in manifests if m["kind"] in CUSTOM])


def _validate_custom(manifests: list[dict[str, Any]]) -> None:
    """Custom resources against their CRD schemas; RayCluster's pod templates as core ones."""
    operators = [m for m in manifests if m["kind"] != "RayCluster"]
    if operators:
        assert _operator_errors(operators) == [""] * len(operators)
    schema = json.loads((CRDS / "raycluster.schema.json").read_text())
    for cluster in (m for m in manifests if m["kind"] == "RayCluster"):
        jsonschema.validate(cluster, schema)
        spec = cluster["spec"]
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
            kubernetes_validate.validate(
                {**template, "template": group["template"]}, KUBERNETES, strict=True
            )


def _operator_errors(manifests: list[dict[str, Any]]) -> list[str]:
    """Per manifest, what the operator's schema refuses ("" when valid)."""
    node = shutil.which("node")
    if node is None or not (CRDS / "node_modules").is_dir():
        if os.environ.get("PIPELINE_TESTS_REQUIRE_CRDS"):
            pytest.fail("the CRD schemas are missing: npm ci --prefix tests/crds (Node.js 18+)")
        pytest.skip("the CRD schemas are not installed: npm ci --prefix tests/crds")
    done = subprocess.run(
        [node, "validate.mjs"],
        cwd=CRDS,
        input=json.dumps(manifests),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    errors: list[str] = json.loads(done.stdout)
    return errors


def test_the_crd_schemas_refuse_what_an_operator_would() -> None:
    """The schemas are the operators': wrong types, patterns and unknown Ray fields fail."""
    [monitor] = [m for m in _render("values-prod.yaml") if m["kind"] == "ServiceMonitor"]
    [scaler] = [m for m in _render("values-prod.yaml") if m["kind"] == "ScaledObject"]
    bad_interval = json.loads(json.dumps(monitor))
    bad_interval["spec"]["endpoints"][0]["interval"] = "15 seconds"
    bad_count = json.loads(json.dumps(scaler))
    bad_count["spec"]["minReplicaCount"] = "1"
    errors = _operator_errors([monitor, bad_interval, bad_count])
    assert errors[0] == ""
    assert "interval must match pattern" in errors[1]
    assert "minReplicaCount must be integer" in errors[2]
    [cluster] = [m for m in _render("values-prod.yaml") if m["kind"] == "RayCluster"]
    _validate_custom([cluster])
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        _validate_custom([cluster])


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
    deployments = _pipeline_deployments(_render("values-prod.yaml"))
    assert sorted(deployments) == ["api", "projections", "worker"]
    processes = yaml.safe_load((CHART / "values-prod.yaml").read_text())["worker"]["processes"]
    assert processes > 1
    for component, deployment in deployments.items():
        containers = deployment["spec"]["template"]["spec"]["containers"]
        assert len(containers) == (processes if component == "worker" else 1)
        numbers = metrics_ports(Settings(_env_file=None, processes=processes))
        for i, container in enumerate(containers):
            [port] = container["ports"]
            assert port["containerPort"] == (
                numbers[i] if component == "worker" else ports[component]
            )
            probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
            for probe, path in probes.items():
                assert container[probe]["httpGet"] == {"path": path, "port": port["name"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            if component == "worker":  # one process per container, on its own port
                assert env["PIPELINE_METRICS_PORT"] == str(port["containerPort"])
                assert env.get("PIPELINE_PROCESSES", "1") == "1"
            assert set(env) <= fields, set(env) - fields
            assert not any(
                "value" in e and "PASSWORD" in e["name"] and not e["name"].endswith("_FILE")
                for e in container["env"]
            ), "secrets are mounted, never inlined"


def _pipeline_deployments(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pipeline's own Deployments by component (not the NATS exporter's)."""
    return {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m
        for m in manifests
        if m["kind"] == "Deployment" and m["metadata"]["name"] != "pl-nats-exporter"
    }


@pytest.mark.parametrize("values_file", [None, "values-prod.yaml"])
def test_every_process_and_the_nats_exporter_are_scraped(values_file: str | None) -> None:
    """Each container port serving metrics has a Service port, a ServiceMonitor endpoint and
    a NetworkPolicy opening; the scrape jobs are named as in deploy/prometheus."""
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else {}
    values = {**values, "prometheusOperator": {"enabled": True}}
    manifests = [
        doc
        for text in Chart.load(CHART).render(values, name="pl", namespace="pipeline").values()
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    container_ports = {
        (
            m["metadata"]["labels"]["app.kubernetes.io/component"],
            port["name"],
            port["containerPort"],
        )
        for m in manifests
        if m["kind"] == "Deployment"
        for container in m["spec"]["template"]["spec"]["containers"]
        for port in container["ports"]
    }
    assert {c for c, _, _ in container_ports} == {"worker", "projections", "api", "nats-exporter"}
    [service] = [
        m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == "pl-metrics"
    ]
    targets = {p["targetPort"] for p in service["spec"]["ports"]}
    [monitor] = [m for m in manifests if m["kind"] == "ServiceMonitor"]
    scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert scraped == targets == {name for _, name, _ in container_ports}
    for endpoint in monitor["spec"]["endpoints"]:
        [relabel] = endpoint["relabelings"]
        assert relabel["targetLabel"] == "job"
        assert relabel["replacement"] == (
            "nats" if endpoint["port"] == "nats-metrics" else "pipeline-$1"
        )
    policies = {
        m["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: m["spec"]["ingress"]
        for m in manifests
        if m["kind"] == "NetworkPolicy"
    }
    for component, _, number in container_ports:
        [rule] = policies[component]
        assert any(p["port"] <= number <= p.get("endPort", p["port"]) for p in rule["ports"]), (
            component,
            number,
        )


def test_the_chart_alert_rules_are_the_shipped_ones() -> None:
    [rule] = [m for m in _render("values-prod.yaml") if m["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_the_nats_exporter_runs_with_documented_flags_and_the_compose_files_image() -> None:
    from .test_deploy import DEPLOY, EXPORTER_IMAGE, exporter_problems

    [exporter] = [
        m
        for m in _render("values-prod.yaml")
        if m["kind"] == "Deployment" and m["metadata"]["name"] == "pl-nats-exporter"
    ]
    [container] = exporter["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert EXPORTER_IMAGE.match(container["image"])
    assert container["image"] == compose["services"]["nats-exporter"]["image"]
    assert exporter_problems(container["args"]) == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert container["args"][-1] == values["natsExporter"]["monitoringUrl"]
    [port] = container["ports"]
    assert f"-port={port['containerPort']}" in container["args"]
