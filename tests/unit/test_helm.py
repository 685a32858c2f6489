"""The Helm chart renders and lints with each values file, and its manifests are valid."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python.chart import Chart, lint
from helm_python.errors import HelmRenderError

from pipeline.ops.supervisor import metrics_ports
from pipeline.settings import Settings

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "event-pipeline"
ALERTS = Path(__file__).parents[2] / "deploy" / "prometheus" / "alerts.yml"
KUBERNETES = "1.31.0"
CUSTOM = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "RayCluster", "ScaledObject", "Cluster"}
CRDS = Path(__file__).parents[1] / "crds"
"""The custom resources' schemas: the operators' CRDs as kubernetes-models publishes them
(npm; `npm ci --prefix tests/crds`), RayCluster's written from KubeRay's reference, and
CloudNativePG's Cluster's taken from its CRD."""
VALUES_FILES = [
    None,
    "values-dev.yaml",
    "values-prod.yaml",
    "values-small.yaml",
    "values-large.yaml",
]
SITES = ["values-small.yaml", "values-large.yaml"]
"""The values of a small and a large site: NATS and PostgreSQL in the release."""


def _render(values_file: str | None, **overrides: Any) -> list[dict[str, Any]]:
    """The chart's manifests with a values file, its top-level keys replaced by `overrides`."""
    values = yaml.safe_load((CHART / values_file).read_text()) if values_file else None
    if overrides:
        values = {**(values or {}), **overrides}
    rendered = Chart.load(CHART).render(values, name="pl", namespace="pipeline")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.mark.parametrize("values_file", VALUES_FILES)
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
    """Custom resources against their CRD schemas; RayCluster's pod templates as core ones.
    The schemas in this repository first: without the npm ones the rest is skipped."""
    for cluster in (m for m in manifests if m["kind"] == "Cluster"):
        jsonschema.validate(cluster, _cnpg_schema())
    schema = json.loads((CRDS / "raycluster.schema.json").read_text())
    for cluster in (m for m in manifests if m["kind"] == "RayCluster"):
        jsonschema.validate(cluster, schema)
        spec = cluster["spec"]
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
            kubernetes_validate.validate(
                {**template, "template": group["template"]}, KUBERNETES, strict=True
            )
    operators = [m for m in manifests if m["kind"] not in ("RayCluster", "Cluster")]
    if operators:
        assert _operator_errors(operators) == [""] * len(operators)


def _strict(schema: Any) -> Any:
    """A CRD's schema refusing unknown fields, as the API server's strict field validation
    does (`kubectl apply` refuses them), where the CRD keeps none."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        strict["additionalProperties"] = False
    return strict


def _cnpg_schema() -> dict[str, Any]:
    """CloudNativePG's Cluster (postgresql.cnpg.io/v1), from its CRD, strict."""
    schema: dict[str, Any] = json.loads((CRDS / "cloudnativepg-cluster.schema.json").read_text())
    strict: dict[str, Any] = _strict(schema)
    strict["properties"]["apiVersion"] = {"const": "postgresql.cnpg.io/v1"}
    strict["properties"]["kind"] = {"const": "Cluster"}
    strict["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return strict


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
    in_release = {"Cluster", "PodMonitor"}  # the servers of a site in the release
    assert {m["kind"] for m in _render("values-prod.yaml")} >= CUSTOM - in_release
    assert {m["kind"] for m in _render("values-large.yaml")} >= CUSTOM
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
        m["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: m["spec"].get(
            "ingress", []
        )
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


HOOK = "pre-install,pre-upgrade"
KINDS = {"worker": "writer", "projections": "projector", "api": "api"}
"""Each Deployment's PostgreSQL role (`pipeline db migrate` makes them)."""


def _values(values_file: str | None) -> dict[str, Any]:
    """The chart's values with a values file over them (top-level keys merged)."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file:
        for key, value in yaml.safe_load((CHART / values_file).read_text()).items():
            merged = {**values[key], **value} if isinstance(value, dict) else value
            values[key] = merged
    return values


def _jobs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m
        for m in manifests
        if m["kind"] == "Job"
    }


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _secret_of(pod: dict[str, Any], container: dict[str, Any], path: str) -> str:
    """The Secret a file of the container comes from (it must be a mounted Secret)."""
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return str(volume["secret"]["secretName"])


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_the_migration_then_the_streams_run_as_hooks_before_the_processes(
    values_file: str | None,
) -> None:
    """`pipeline db migrate` as the owner, then `pipeline streams apply` as the NATS
    operator, as pre-install and pre-upgrade hooks, with their NetworkPolicies first; after
    the install's resources where NATS or PostgreSQL are among them."""
    manifests, values = _render(values_file), _values(values_file)
    in_release = values["nats"].get("enabled") or values["postgresql"]["cloudnativepg"]["enabled"]
    hook = "post-install,pre-upgrade" if in_release else HOOK
    jobs = _jobs(manifests)
    assert sorted(jobs) == ["db-migrate", "streams-apply"]
    weights = {}
    for name, job in jobs.items():
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == hook
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
        weights[name] = int(annotations["helm.sh/hook-weight"])
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert weights["db-migrate"] < weights["streams-apply"], "the migration runs first"
    pod = jobs["db-migrate"]["spec"]["template"]["spec"]
    [migrate] = pod["containers"]
    env = _env(migrate)
    assert migrate["args"] == ["db", "migrate"]
    assert env["PIPELINE_POSTGRES_USER"] == values["postgres"]["owner"]["user"]
    secret = _secret_of(pod, migrate, env["PIPELINE_POSTGRES_PASSWORD_FILE"])
    assert secret == values["postgres"]["owner"]["passwordSecret"]
    for role, role_values in values["postgres"]["roles"].items():
        path = env[f"PIPELINE_POSTGRES_{role.upper()}_PASSWORD_FILE"]
        assert _secret_of(pod, migrate, path) == role_values["passwordSecret"]
    pod = jobs["streams-apply"]["spec"]["template"]["spec"]
    [apply] = pod["containers"]
    env = _env(apply)
    assert apply["args"] == ["streams", "apply"]
    assert env["PIPELINE_NATS_USER"] == values["nats"]["operator"]["user"] == "operator"
    secret = _secret_of(pod, apply, env["PIPELINE_NATS_PASSWORD_FILE"])
    assert secret == values["nats"]["operator"]["passwordSecret"]
    policies = {
        m["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: m
        for m in manifests
        if m["kind"] == "NetworkPolicy"
    }
    if not values["networkPolicy"]["enabled"]:
        assert not set(jobs) & set(policies)
        return
    nats_port = urlsplit(_env(apply)["PIPELINE_NATS_URL"].split(",")[0]).port or 4222
    ports = {"db-migrate": values["postgres"]["port"], "streams-apply": nats_port}
    for name, port in ports.items():
        policy = policies[name]
        annotations = policy["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == hook  # with its Job (pre-install: before all)
        assert int(annotations["helm.sh/hook-weight"]) < weights[name]
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert not policy["spec"].get("ingress")
        opened = {(p["port"], p["protocol"]) for r in policy["spec"]["egress"] for p in r["ports"]}
        assert opened == {(53, "UDP"), (53, "TCP"), (port, "TCP")}


@pytest.mark.parametrize("values_file", [None, "values-prod.yaml", *SITES])
def test_each_deployment_connects_as_its_role_with_its_own_secret(
    values_file: str | None,
) -> None:
    """Worker, projections and API log in as the roles the migration makes, each with the
    Secret the migration set its password from; none holds the owner's or another's."""
    manifests, values = _render(values_file), _values(values_file)
    roles = Settings(_env_file=None, postgres_roles_prefix=values["postgres"]["rolesPrefix"])
    migrate_pod = _jobs(manifests)["db-migrate"]["spec"]["template"]["spec"]
    [migrate] = migrate_pod["containers"]
    secrets = {}
    for component, deployment in _pipeline_deployments(manifests).items():
        kind = KINDS[component]
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            env = _env(container)
            assert env["PIPELINE_POSTGRES_USER"] == roles.postgres_role(kind)  # type: ignore[arg-type]
            secret = _secret_of(pod, container, env["PIPELINE_POSTGRES_PASSWORD_FILE"])
            assert secret == values["postgres"]["roles"][kind]["passwordSecret"]
            role_file = _env(migrate)[f"PIPELINE_POSTGRES_{kind.upper()}_PASSWORD_FILE"]
            assert _secret_of(migrate_pod, migrate, role_file) == secret
            secrets[component] = secret
        mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        assert values["postgres"]["owner"]["passwordSecret"] not in mounted, component
        assert not (mounted & set(secrets.values())) - {secrets[component]}, component
    assert len(set(secrets.values())) == 3


@pytest.mark.parametrize("values_file", ["values-prod.yaml", *SITES])
def test_the_streams_job_applies_what_the_worker_checks(
    values_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.app import stream_definitions

    from .test_deploy import settings_of

    manifests = _render(values_file)
    [apply] = _jobs(manifests)["streams-apply"]["spec"]["template"]["spec"]["containers"]
    applied = stream_definitions(settings_of(_env(apply), monkeypatch))
    worker = _pipeline_deployments(manifests)["worker"]
    for container in worker["spec"]["template"]["spec"]["containers"]:
        assert stream_definitions(settings_of(_env(container), monkeypatch)) == applied
        assert _env(container)["PIPELINE_NATS_URL"] == _env(apply)["PIPELINE_NATS_URL"]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_no_secret_is_inlined_and_every_secret_file_is_a_mounted_secret(
    values_file: str | None,
) -> None:
    fields = {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}
    for manifest in _render(values_file):
        if manifest["kind"] not in ("Deployment", "Job"):
            continue
        pod = manifest["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for variable in container.get("env", []):
                name = variable["name"]
                if name.startswith("PIPELINE_"):
                    assert name in fields, name
                secret = any(word in name for word in ("PASSWORD", "TOKEN", "REDIS_URL"))
                if secret and not name.endswith("_FILE"):
                    assert "value" not in variable, f"{manifest['metadata']['name']}: {name}"
                if name.endswith("_FILE") and variable["value"].startswith("/run/secrets/"):
                    assert _secret_of(pod, container, variable["value"])


def test_ray_keeps_token_authentication_and_its_nodes_are_closed_both_ways() -> None:
    """Every Ray node and the worker read the token from the same Secret; the nodes take
    connections from each other and the worker's client port only, and reach only each
    other and DNS."""
    manifests, values = _render("values-prod.yaml"), _values("values-prod.yaml")
    secret = values["ray"]["authTokenSecret"]
    [cluster] = [m for m in manifests if m["kind"] == "RayCluster"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    selector = {
        "app.kubernetes.io/name": "event-pipeline",
        "app.kubernetes.io/instance": "pl",
        "app.kubernetes.io/component": "ray",
    }
    for group in groups:
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        [node] = template["spec"]["containers"]
        env = _env(node)
        assert env["RAY_AUTH_MODE"] == "token"
        assert _secret_of(template["spec"], node, env["RAY_AUTH_TOKEN_PATH"]) == secret
    [worker] = [
        m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "pl-worker"
    ]
    pod = worker["spec"]["template"]["spec"]
    for container in pod["containers"]:
        env = _env(container)
        assert _secret_of(pod, container, env["PIPELINE_RAY_AUTH_TOKEN_FILE"]) == secret
        assert env["PIPELINE_DETECTOR_MODEL_SHA256"] == values["detector"]["modelSha256"]

    [policy] = [
        m["spec"]
        for m in manifests
        if m["kind"] == "NetworkPolicy" and m["spec"]["podSelector"]["matchLabels"] == selector
    ]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    workers = {**selector, "app.kubernetes.io/component": "worker"}
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": selector}}]},
        {
            "from": [{"podSelector": {"matchLabels": workers}}],
            "ports": [{"port": 10001, "protocol": "TCP"}],
        },
    ]
    [nodes, dns] = policy["egress"]
    assert nodes == {"to": [{"podSelector": {"matchLabels": selector}}]}
    assert {p["port"] for p in dns["ports"]} == {53} and all(t for t in dns["to"])


def _worker_containers(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    rendered = Chart.load(CHART).render(values, name="pl", namespace="pipeline")
    docs = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    worker = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pl-worker"
    )
    containers: list[dict[str, Any]] = worker["spec"]["template"]["spec"]["containers"]
    return containers


def test_the_worker_runs_the_inference_image_only_where_it_runs_the_detector() -> None:
    """The chart's image is the core install (no detection extra): a worker with frames
    and no Ray cluster runs its detector on a local Ray, in the inference image."""

    def images(values: dict[str, Any] | None) -> set[str]:
        containers = _worker_containers(values)
        assert all(
            c["command"] == ["pipeline"] and c["args"] == ["run", "worker"] for c in containers
        )
        return {c["image"] for c in containers}

    assert images(None) == {"event-pipeline-gpu:0.1.0"}  # frames, no cluster: a local Ray
    assert images({"ray": {"address": "ray://ray-head:10001"}}) == {"event-pipeline:0.1.0"}
    assert images({"ray": {"kuberay": {"enabled": True}}}) == {"event-pipeline:0.1.0"}
    assert images({"worker": {"domains": '["security", "metrics"]'}}) == {"event-pipeline:0.1.0"}
    assert images({"worker": {"image": "registry/worker:1"}}) == {"registry/worker:1"}


SITES_EXAMPLE = Path(__file__).parents[2] / "projections" / "incidents" / "sites.example.yaml"


def _with_incidents(**incidents: Any) -> dict[str, Any]:
    """The production values with the incident process enabled."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values-prod.yaml").read_text())
    return {**values, "incidents": {"enabled": True, **incidents}}


def _render_values(values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = Chart.load(CHART).render(values, name="pl", namespace="pipeline")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def test_the_incident_process_runs_as_the_projector_on_its_sites_file(tmp_path: Path) -> None:
    """Enabled, `pipeline run incidents` runs as the projector role on the sites file of a
    ConfigMap made from the values, probed, scraped, opened on its port and budgeted."""
    from projections.incidents import load_sites

    values = _with_incidents(sites=SITES_EXAMPLE.read_text())
    assert lint(CHART, values, strict=True)["errors"] == []
    manifests = _render_values(values)
    for manifest in manifests:
        if manifest["kind"] not in CUSTOM:
            kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    deployment = _pipeline_deployments(manifests)["incidents"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = _env(container)
    assert container["args"] == ["run", "incidents"]
    settings = Settings(
        _env_file=None, postgres_roles_prefix=_values(None)["postgres"]["rolesPrefix"]
    )
    assert env["PIPELINE_POSTGRES_USER"] == settings.postgres_role("projector")
    secret = _secret_of(pod, container, env["PIPELINE_POSTGRES_PASSWORD_FILE"])
    assert secret == _values(None)["postgres"]["roles"]["projector"]["passwordSecret"]
    assert set(env) <= {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}
    [port] = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", settings.incidents_metrics_port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # The sites file: the ConfigMap's, mounted where PIPELINE_SITES_FILE says, and it loads.
    folder, _, name = env["PIPELINE_SITES_FILE"].rpartition("/")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [config] = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == volume["configMap"]["name"]
    ]
    (tmp_path / name).write_text(config["data"][name])
    assert load_sites(tmp_path / name).zones
    # Scraped as pipeline-incidents (the Service's `metrics` port targets each pod's own),
    # and reachable there.
    [monitor] = [m for m in manifests if m["kind"] == "ServiceMonitor"]
    assert "metrics" in {e["port"] for e in monitor["spec"]["endpoints"]}
    [policy] = [
        m
        for m in manifests
        if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] == "pl-incidents"
    ]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": port["containerPort"], "protocol": "TCP"}]
    assert "pl-incidents" in {
        m["metadata"]["name"] for m in manifests if m["kind"] == "PodDisruptionBudget"
    }
    jobs = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())["scrape_configs"]
    assert "pipeline-incidents" in {job["job_name"] for job in jobs}


def test_the_incident_process_is_off_by_default_and_needs_a_sites_file() -> None:
    for values_file in (None, "values-dev.yaml", "values-prod.yaml"):
        manifests = _render(values_file)
        assert "incidents" not in _pipeline_deployments(manifests), values_file
        assert not [m for m in manifests if m["kind"] == "ConfigMap"], values_file
    with pytest.raises(HelmRenderError, match=r"incidents\.sites: the sites file's content"):
        _render_values(_with_incidents())
    manifests = _render_values(_with_incidents(sitesConfigMap="our-sites"))
    assert not [m for m in manifests if m["kind"] == "ConfigMap"]
    pod = _pipeline_deployments(manifests)["incidents"]["spec"]["template"]["spec"]
    assert {"name": "our-sites"} in [v.get("configMap") for v in pod["volumes"]]


def test_the_incident_process_and_the_api_use_nats_as_their_own_users() -> None:
    """The evidence frames: the incident process writes the bucket as user incidents, the
    API reads it as user api, each with its own Secret (deploy/nats/accounts.conf)."""
    manifests = _render_values(_with_incidents(sites=SITES_EXAMPLE.read_text()))
    nats = _values(None)["nats"]
    deployments = _pipeline_deployments(manifests)
    for component, user in (("incidents", nats["incidents"]), ("api", nats["api"])):
        pod = deployments[component]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = _env(container)
        assert env["PIPELINE_NATS_URL"] == nats["url"]
        assert env["PIPELINE_NATS_USER"] == user["user"]
        password = env["PIPELINE_NATS_PASSWORD_FILE"]
        assert _secret_of(pod, container, password) == user["passwordSecret"]
        assert _secret_of(pod, container, env["PIPELINE_NATS_TLS_CA_FILE"]) == nats["caSecret"]


# -- NATS and PostgreSQL in the release -------------------------------------------------

NATS_ACCOUNTS = Path(__file__).parents[2] / "deploy" / "nats" / "accounts.conf"


def _pipeline_containers(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container of the pipeline's Deployments and hook Jobs."""
    return [
        container
        for m in manifests
        if m["kind"] in ("Deployment", "Job")
        and m["metadata"]["labels"].get("app.kubernetes.io/name") == "event-pipeline"
        and m["metadata"]["name"] != "pl-nats-exporter"
        for container in m["spec"]["template"]["spec"]["containers"]
    ]


def test_the_nats_dependency_is_the_vendored_chart_and_off_by_default() -> None:
    import tarfile

    [dependency] = yaml.safe_load((CHART / "Chart.yaml").read_text())["dependencies"]
    assert dependency["condition"] == "nats.enabled"
    with tarfile.open(CHART / "charts" / f"nats-{dependency['version']}.tgz") as archive:
        vendored = yaml.safe_load(archive.extractfile("nats/Chart.yaml").read())  # type: ignore[union-attr]
        assert "Apache License" in archive.extractfile("nats/LICENSE").read().decode()  # type: ignore[union-attr]
    assert (vendored["name"], vendored["version"]) == (dependency["name"], dependency["version"])
    for values_file in (None, "values-dev.yaml", "values-prod.yaml"):
        kinds = {m["kind"] for m in _render(values_file)}
        assert not kinds & {"StatefulSet", "Cluster"}, values_file
    assert (CHART / "files" / "nats-accounts.conf").read_text() == NATS_ACCOUNTS.read_text()


@pytest.mark.parametrize(
    ("values_file", "servers"), [("values-small.yaml", 1), ("values-large.yaml", 3)]
)
def test_nats_in_the_release_keeps_jetstream_on_volumes_and_every_process_lists_its_servers(
    values_file: str, servers: int
) -> None:
    manifests = _render(values_file)
    [statefulset] = [m for m in manifests if m["kind"] == "StatefulSet"]
    assert statefulset["spec"]["replicas"] == servers
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    [nats] = [
        c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "nats"
    ]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in nats["volumeMounts"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    config = _nats_conf(manifests)
    assert '"store_dir": "/data"' in config and '"sync_interval": always' in config
    assert ("routes" in config) == (servers > 1)
    # Each pod of the StatefulSet, through its headless Service, in every process.
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    assert service in {m["metadata"]["name"] for m in manifests if m["kind"] == "Service"}
    urls = [f"tls://{name}-{i}.{service}.pipeline.svc:4222" for i in range(servers)]
    containers = _pipeline_containers(manifests)
    assert len(containers) >= 5
    for container in containers:
        env = _env(container)
        if "PIPELINE_NATS_URL" in env:
            assert env["PIPELINE_NATS_URL"] == ",".join(urls)
            assert (
                Settings(_env_file=None, nats_url=env["PIPELINE_NATS_URL"]).nats_servers() == urls
            )
        if "PIPELINE_DOMAINS" in env:  # the streams Job and the worker: replicated on all
            assert env["PIPELINE_STREAM_REPLICAS"] == str(servers)
    # Metrics: an exporter beside each server (the NATS chart's), not this chart's one.
    names = {c["name"] for c in statefulset["spec"]["template"]["spec"]["containers"]}
    assert "prom-exporter" in names
    assert "pl-nats-exporter" not in {m["metadata"]["name"] for m in manifests}
    # KEDA asks the headless Service, and a clustered stream's leader by its pod's name.
    for scaler in (m for m in manifests if m["kind"] == "ScaledObject"):
        [headless] = [m for m in manifests if m["metadata"]["name"] == service]
        monitor = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "monitor")
        for trigger in scaler["spec"]["triggers"]:
            endpoint = trigger["metadata"]["natsServerMonitoringEndpoint"]
            assert endpoint == f"{service}.pipeline.svc.cluster.local:{monitor}"


@pytest.mark.parametrize("values_file", SITES)
def test_the_nats_servers_take_routes_from_each_other_only(values_file: str) -> None:
    """A route is a server joining the cluster, and sees every message: only the NATS pods
    may open one. Every port of theirs is named by a rule; the unauthenticated monitoring
    port is open to KEDA's namespace only, the client port to anyone (producers)."""
    manifests = _render(values_file)
    [statefulset] = [m for m in manifests if m["kind"] == "StatefulSet"]
    pods = statefulset["spec"]["selector"]["matchLabels"]
    [policy] = [
        m
        for m in manifests
        if m["kind"] == "NetworkPolicy" and m["spec"]["podSelector"]["matchLabels"] == pods
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    ports = {
        p["containerPort"]
        for c in statefulset["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    clustered = statefulset["spec"]["replicas"] > 1
    assert ports == set(rules) == {4222, 8222, 7777} | ({6222} if clustered else set())
    if clustered:
        assert rules[6222] == [{"podSelector": {"matchLabels": pods}}]
    assert rules[8222] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}
    ]
    assert rules[4222] is None and rules[7777] is None
    narrowed = _render(
        values_file,
        networkPolicy={
            "enabled": True,
            "nats": {"clients": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "monitor": []},
        },
    )
    [again] = [
        m for m in narrowed if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] == "pl-nats"
    ]
    kubernetes_validate.validate(again, KUBERNETES, strict=True)
    rules = {r["ports"][0]["port"]: r.get("from") for r in again["spec"]["ingress"]}
    assert rules[4222] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert 8222 not in rules  # no peers: the port closed (an empty `from` would open it)


def _nats_conf(manifests: list[dict[str, Any]]) -> str:
    [config] = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == "pl-nats-config"
    ]
    return str(config["data"]["nats.conf"])


@pytest.mark.parametrize("values_file", SITES)
def test_the_rendered_nats_conf_is_one_nats_server_accepts(
    values_file: str, tmp_path: Path
) -> None:
    """The NATS chart's nats.conf with the pipeline's accounts (mounted from this chart's
    ConfigMap where the include expects them), checked by nats-server itself (`-t`)."""
    from pipeline.ops.embedded import nats_server_binary

    manifests = _render(values_file)
    [statefulset] = [m for m in manifests if m["kind"] == "StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    [nats] = [c for c in pod["containers"] if c["name"] == "nats"]
    [mount] = [m for m in nats["volumeMounts"] if m["mountPath"].startswith("/etc/nats-config/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [accounts] = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"] == volume["configMap"]["name"]
    ]
    assert accounts["data"]["accounts.conf"] == NATS_ACCOUNTS.read_text()
    folder = tmp_path / mount["mountPath"].removeprefix("/etc/nats-config/")
    folder.mkdir(parents=True)
    (folder / "accounts.conf").write_text(accounts["data"]["accounts.conf"])
    _self_signed(tmp_path)
    config = (
        _nats_conf(manifests)
        .replace("/etc/nats-certs/nats", str(tmp_path))
        .replace('"/data"', f'"{tmp_path / "data"}"')
        .replace("/var/run/nats", str(tmp_path))
    )
    (tmp_path / "nats.conf").write_text(config)
    # The password hashes come from the Secret in envFrom: one variable per user.
    [source] = nats["envFrom"]
    assert source["secretRef"]["name"] == "pipeline-nats-password-hashes"
    names = set(re.findall(r"\$(NATS_[A-Z_]+_PASSWORD)\b", NATS_ACCOUNTS.read_text()))
    hashed = '"$2a$04$EiE2mSVeiVtlV7yYGy0Ffe7mCmVUnhFeZpD0wNUvC6ZdRzZnbKzpG"'
    env = {**os.environ, "SERVER_NAME": "pl-nats-0", **dict.fromkeys(names, hashed)}
    done = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stdout + done.stderr
    without = {k: v for k, v in env.items() if k != "NATS_WORKER_PASSWORD"}
    refused = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "nats.conf")],
        env=without,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0, "a user's missing password hash must stop the server"


def _self_signed(folder: Path) -> None:
    """tls.crt and tls.key, as the servers' TLS Secret holds them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pl-nats")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (folder / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    ("values_file", "instances", "synchronous"),
    [
        ("values-small.yaml", 1, None),
        ("values-large.yaml", 3, {"method": "any", "number": 1, "dataDurability": "required"}),
    ],
)
def test_postgresql_in_the_release_is_a_cloudnativepg_cluster_the_processes_reach_by_rw(
    values_file: str, instances: int, synchronous: dict[str, Any] | None
) -> None:
    manifests, values = _render(values_file), _values(values_file)
    [cluster] = [m for m in manifests if m["kind"] == "Cluster"]
    jsonschema.validate(cluster, _cnpg_schema())
    spec = cluster["spec"]
    assert spec["instances"] == instances
    assert spec["postgresql"].get("synchronous") == synchronous
    assert spec["bootstrap"]["initdb"]["database"] == values["postgres"]["dbname"]
    # The migration logs in as the superuser whose password CloudNativePG sets from the
    # owner's Secret.
    assert spec["enableSuperuserAccess"] is True
    assert spec["superuserSecret"]["name"] == values["postgres"]["owner"]["passwordSecret"]
    assert values["postgres"]["owner"]["user"] == "postgres"
    for container in _pipeline_containers(manifests):
        host = _env(container)["PIPELINE_POSTGRES_HOST"]
        assert host == f"{cluster['metadata']['name']}-rw", container["name"]


def test_the_chart_default_cluster_is_a_primary_and_a_synchronous_standby() -> None:
    manifests = _render_values({"postgresql": {"cloudnativepg": {"enabled": True}}})
    [cluster] = [m for m in manifests if m["kind"] == "Cluster"]
    jsonschema.validate(cluster, _cnpg_schema())
    assert cluster["spec"]["instances"] == 2
    assert cluster["spec"]["postgresql"]["synchronous"]["number"] == 1
    with pytest.raises(HelmRenderError, match=r"instances \(1\) must be more than"):
        _render_values({"postgresql": {"cloudnativepg": {"enabled": True, "instances": 1}}})


def test_the_cloudnativepg_schema_refuses_what_the_operator_would() -> None:
    [cluster] = [m for m in _render("values-large.yaml") if m["kind"] == "Cluster"]
    schema = _cnpg_schema()
    jsonschema.validate(cluster, schema)
    changes: list[tuple[str, Any]] = [
        ("instances", 0),
        ("instances", "3"),
        ("primaryUpdateStrategy", "sometimes"),
        ("minSyncReplica", 1),  # a misspelt field
    ]
    for field, value in changes:
        bad = json.loads(json.dumps(cluster))
        bad["spec"][field] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["postgresql"]["synchronous"]["method"] = "all"
    with pytest.raises(jsonschema.ValidationError, match="'all' is not one of"):
        jsonschema.validate(bad, schema)
    del bad["spec"]["postgresql"]["synchronous"]["number"]
    with pytest.raises(jsonschema.ValidationError, match="'number' is a required property"):
        jsonschema.validate(bad, schema)
