"""The shipped NATS configuration is valid and carries the largest frame the worker accepts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.app import HEADER_ROOM
from pipeline.ops.embedded import nats_server_binary
from pipeline.settings import Settings

NATS_CONF = Path(__file__).parents[2] / "deploy" / "nats" / "nats.conf"
_UNITS = {"": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def test_nats_conf_is_valid_for_the_server_the_pipeline_ships(tmp_path: Path) -> None:
    """Parsed (`-t`) with what the server's environment must give it."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    env = {
        "NATS_STORE_DIR": str(tmp_path),
        "NATS_TLS_CERT": str(cert),
        "NATS_TLS_KEY": str(key),
        **{f"NATS_{role}_PASSWORD": "secret" for role in ROLES},
    }
    _self_signed(cert, key)
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(NATS_CONF)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    del env["NATS_WORKER_PASSWORD"]
    missing = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(NATS_CONF)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode != 0 and "NATS_WORKER_PASSWORD" in missing.stderr


ROLES = ("OPERATOR", "WORKER", "SECURITY_PRODUCER", "MONITORING_PRODUCER")
ROLES += ("METRICS_PRODUCER", "FRAMES_PRODUCER")


def _self_signed(cert: Path, key: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def test_nats_conf_max_payload_carries_the_default_frame_limit() -> None:
    match = re.search(r"^max_payload:\s*(\d+)\s*(KB|MB|GB)?\s*$", NATS_CONF.read_text(), re.M)
    assert match, "deploy/nats/nats.conf must set max_payload"
    max_payload = int(match.group(1)) * _UNITS[match.group(2) or ""]
    assert max_payload >= Settings(_env_file=None).max_frame_bytes + HEADER_ROOM
    assert "sync_interval: always" in NATS_CONF.read_text()


DEPLOY = Path(__file__).parents[2] / "deploy"
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_dockerfiles_pass_hadolint(name: str) -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DEPLOY / name)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / name).read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "AS build" in text
    assert "licences.json" in text, "the image ships its dependency licence report"


def test_the_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_pipeline_variable_the_compose_file_sets_is_a_setting() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    names = {
        name
        for service in compose["services"].values()
        for name in (service.get("environment") or {})
        if name.startswith("PIPELINE_")
    }
    assert names, "the compose file configures the pipeline"
    assert names <= {f"PIPELINE_{field.upper()}" for field in Settings.model_fields}


def test_the_healthcheck_command_finds_a_live_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.metrics import Metrics, serve_metrics
    from pipeline.ops.cli import main
    from pipeline.ops.embedded import free_port

    monkeypatch.chdir(DEPLOY)  # no stray .env file
    for name in ("METRICS_PORT", "PROJECTIONS_METRICS_PORT", "API_PORT"):
        monkeypatch.setenv(f"PIPELINE_{name}", str(free_port()))
    assert main(["healthcheck"]) == 1
    port = free_port()
    monkeypatch.setenv("PIPELINE_PROJECTIONS_METRICS_PORT", str(port))
    server = serve_metrics(Metrics(), "127.0.0.1", port)
    try:
        assert main(["healthcheck"]) == 0
    finally:
        server.shutdown()


PROMETHEUS = DEPLOY / "prometheus"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("PIPELINE_TESTS_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is missing (Debian: apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_the_alert_rules_and_prometheus_config_pass_promtool() -> None:
    promtool = _promtool()
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pipeline.json"


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """Each query of the dashboard parses (as a recording rule checked by promtool)."""
    promtool = _promtool()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(_dashboard_queries())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "dashboard.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_have_runbooks_and_alerts_and_dashboard_name_exported_metrics() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.metrics import Metrics, ProjectionMetrics, serve_metrics
    from pipeline.ops.embedded import free_port

    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    assert all(rule["annotations"].get("runbook") for rule in rules)
    queries = [rule["expr"] for rule in rules] + _dashboard_queries()
    named = {m for expr in queries for m in re.findall(r"\bpipeline_[a-z_]+", expr)}
    exported: set[str] = set()
    for metrics in (Metrics(), ProjectionMetrics()):  # scraped as Prometheus would
        port = free_port()
        server = serve_metrics(metrics, "127.0.0.1", port)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
                text = answer.read().decode()
        finally:
            server.shutdown()
        for family in text_string_to_metric_families(text):
            exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
    assert named and named <= exported, named - exported


WORKFLOW = Path(__file__).parents[2] / ".github" / "workflows" / "ci.yml"


def test_the_hosted_ci_workflow_passes_actionlint_and_its_schema() -> None:
    for command in (
        [str(BIN / "actionlint"), str(WORKFLOW)],
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            str(WORKFLOW),
        ],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["test"]["steps"]
    assert any(step.get("run") == ".venv/bin/python -m pytest" for step in steps), (
        "the workflow runs the README's test command"
    )
