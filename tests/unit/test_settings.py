"""Settings come from PIPELINE_* variables and fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.detection import DetectorConfig, PoolConfig
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from schemas import Domain


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_NATS_URL", "nats://nats.internal:4222")
    monkeypatch.setenv("PIPELINE_DOMAINS", '["security", "metrics"]')
    monkeypatch.setenv("PIPELINE_RETRY_BACKOFF_S", "[1, 2]")
    settings = Settings(_env_file=None)
    assert settings.nats_url == "nats://nats.internal:4222"
    assert settings.domains == (Domain.SECURITY, Domain.METRICS)
    assert [settings.retry_delay(n) for n in (1, 2, 3)] == [1.0, 2.0, 2.0]


def test_detector_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"PIPELINE_DETECTOR_MODEL: .*a model is a \.pt"):
        DetectorConfig.from_settings(Settings(_env_file=None, detector_model="weights.bin"))
    monkeypatch.setenv("PIPELINE_DETECTOR_CLASSES", "[0, 2]")
    monkeypatch.setenv("PIPELINE_DETECTOR_MAX_WAIT_MS", "20")
    settings = Settings(_env_file=None)
    assert DetectorConfig.from_settings(settings).classes == (0, 2)
    assert PoolConfig.from_settings(settings).max_wait_s == 0.02
    assert settings.domains[0] is Domain.FRAMES


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="batch_sise"):
        Settings(_env_file=None, batch_sise=5)  # type: ignore[call-arg]


def test_a_batch_window_too_short_to_fetch_in_is_refused() -> None:
    """FastStream fetches with what is left of the window, and `pull.fetch` sends no request
    under 1 ms: a 1 ms window would consume nothing, silently."""
    with pytest.raises(ValidationError, match="batch_timeout_s"):
        Settings(_env_file=None, batch_timeout_s=0.001)
    assert Settings(_env_file=None, batch_timeout_s=0.002).batch_timeout_s == 0.002


def test_eventsourcing_environment_is_complete() -> None:
    env = Settings(_env_file=None, postgres_schema="s1").eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "pipeline.store.factory:PostgresFactory"
    assert env["POSTGRES_SCHEMA"] == "s1"
    assert env["POSTGRES_PASSWORD"] == ""
    assert env["POSTGRES_TARGET_SESSION_ATTRS"] == "read-write"


def test_a_primary_and_its_standby_are_one_list_of_hosts_and_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq's lists: one port for every host, or one per host; read-write by default."""
    monkeypatch.setenv("PIPELINE_POSTGRES_HOST", "pg-a, pg-b")
    monkeypatch.setenv("PIPELINE_POSTGRES_PORT", "5432,5433")
    settings = Settings(_env_file=None)
    assert settings.postgres_servers() == [("pg-a", 5432), ("pg-b", 5433)]
    assert settings.postgres_address() == "pg-a:5432, pg-b:5433"
    connection = settings.postgres_connection()
    assert (connection["host"], connection["port"]) == ("pg-a, pg-b", "5432,5433")
    assert connection["target_session_attrs"] == "read-write"
    env = settings.eventsourcing_env()
    assert (env["POSTGRES_HOST"], env["POSTGRES_PORT"]) == ("pg-a, pg-b", "5432,5433")

    one_port = Settings(_env_file=None, postgres_host="a,b,/run/pg", postgres_port=6432)
    assert one_port.postgres_servers() == [("a", 6432), ("b", 6432), ("/run/pg", 6432)]
    assert one_port.postgres_port == "6432"
    anywhere = Settings(_env_file=None, postgres_target_session_attrs="prefer-standby")
    assert anywhere.postgres_connection()["target_session_attrs"] == "prefer-standby"


@pytest.mark.parametrize(
    ("host", "port", "setting", "words"),
    [
        ("pg-a,pg-b", "5432,5433,5434", "PIPELINE_POSTGRES_PORT", "3 ports for the 2 hosts"),
        ("pg-a,pg-b,pg-c", "5432,5433", "PIPELINE_POSTGRES_PORT", "2 ports for the 3 hosts"),
        ("pg-a,,pg-b", "5432", "PIPELINE_POSTGRES_HOST", "an empty host"),
        ("pg-a,pg-b", "5432,", "PIPELINE_POSTGRES_PORT", "'' in '5432,' is not a port"),
        ("pg-a", "http", "PIPELINE_POSTGRES_PORT", "'http' in 'http' is not a port"),
        ("pg-a,pg-b", "5432,70000", "PIPELINE_POSTGRES_PORT", "'70000' in"),
        ("pg-a", "0", "PIPELINE_POSTGRES_PORT", "'0' in '0' is not a port"),
    ],
)
def test_servers_that_do_not_pair_up_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, host: str, port: str, setting: str, words: str
) -> None:
    monkeypatch.setenv("PIPELINE_POSTGRES_HOST", host)
    monkeypatch.setenv("PIPELINE_POSTGRES_PORT", port)
    with pytest.raises(ConfigError) as refused:
        Settings(_env_file=None)
    assert refused.value.setting == setting
    assert words in str(refused.value)
    assert str(refused.value).startswith(f"{setting}: ")


def test_an_unknown_session_attribute_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_POSTGRES_TARGET_SESSION_ATTRS", "writable")
    with pytest.raises(ValidationError, match="postgres_target_session_attrs"):
        Settings(_env_file=None)


def test_the_store_pool_passes_the_session_attributes_and_a_timeout_per_host() -> None:
    """eventsourcing hands host and port lists to libpq as they are; the factory adds
    what it leaves out. Nothing connects here: the pool opens on first use."""
    from eventsourcing.persistence import InfrastructureFactory

    from pipeline.store.factory import PostgresFactory, connection_kwargs

    settings = Settings(
        _env_file=None,
        postgres_host="pg-a,pg-b",
        postgres_port="5432,5433",
        postgres_connect_timeout_s=3,
    )
    env = settings.eventsourcing_env()
    factory = InfrastructureFactory.construct(env)  # as an eventsourcing application does
    assert isinstance(factory, PostgresFactory)
    kwargs = factory.datastore.pool.kwargs
    assert isinstance(kwargs, dict)
    assert kwargs["host"] == "pg-a,pg-b" and kwargs["port"] == "5432,5433"
    assert kwargs["target_session_attrs"] == "read-write"
    assert kwargs["connect_timeout"] == 3
    factory.close()
    plain = connection_kwargs(env)
    assert {k: plain[k] for k in ("host", "port", "target_session_attrs", "connect_timeout")} == {
        "host": "pg-a,pg-b",
        "port": "5432,5433",
        "target_session_attrs": "read-write",
        "connect_timeout": 3,
    }


@pytest.mark.parametrize(("seconds", "whole"), [(0.001, 2), (0.5, 2), (2.0, 2), (2.5, 3), (5, 5)])
def test_the_connect_timeout_is_rounded_up_to_whole_seconds(seconds: float, whole: int) -> None:
    """libpq takes whole seconds (at least 2) and reads 0 as no limit: never round down."""
    settings = Settings(_env_file=None, postgres_connect_timeout_s=seconds)
    assert settings.postgres_connection()["connect_timeout"] == whole
    assert settings.eventsourcing_env()["POSTGRES_CONNECT_TIMEOUT"] == str(whole)


EXAMPLE = Path(__file__).parents[2] / ".env.example"


def test_env_example_documents_every_setting() -> None:
    example = EXAMPLE.read_text()
    names = {line.split("=", 1)[0] for line in example.splitlines() if line.startswith("PIPELINE_")}
    assert names == {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}


def test_the_example_file_holds_the_defaults() -> None:
    assert Settings(_env_file=EXAMPLE) == Settings(_env_file=None)


def test_cache_ttl_must_outlive_redelivery() -> None:
    with pytest.raises(ValidationError, match="dedup_ttl_s"):
        Settings(_env_file=None, dedup_ttl_s=60)


def test_production_refuses_to_start_without_each_secret() -> None:
    bare = Settings(_env_file=None, env="production", redis_url="redis://cache:6379/0")
    with pytest.raises(ConfigError) as worker:
        bare.refuse_unsafe(nats=True)
    message = str(worker.value)
    assert message.startswith("PIPELINE_ENV=production: refusing to start without")
    for setting in ("PIPELINE_NATS_USER", "PIPELINE_POSTGRES_PASSWORD", "PIPELINE_REDIS_URL"):
        assert setting in message
    with pytest.raises(ConfigError, match="PIPELINE_API_TOKENS") as api:
        bare.refuse_unsafe(api=True)
    assert "PIPELINE_NATS_USER" not in str(api.value)  # the API does not use NATS
    safe = bare.model_copy(
        update={
            "nats_creds_file": "/run/secrets/worker.creds",
            "postgres_password": "pw",
            "redis_url": "redis://pipeline:pw@cache:6379/0",
            "api_tokens": {"t": ("read",)},
            "detector_model": "/models/yolo11n.onnx",
            "detector_model_sha256": "0" * 64,
        }
    )
    safe.refuse_unsafe(nats=True, api=True)
    Settings(_env_file=None).refuse_unsafe(nats=True, api=True)  # development: anything goes


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"redis_url": "redis://:pw@cache:6379/0"}, "a Redis ACL user"),
        ({"redis_url": "rediss://default:pw@cache:6379/0"}, "a Redis ACL user"),
        ({"redis_url": "redis://pipeline@cache:6379/0"}, "a Redis ACL user"),
        ({"detector_model": "yolov8n.yaml"}, "PIPELINE_DETECTOR_MODEL is 'yolov8n.yaml'"),
        ({"detector_model_sha256": ""}, "PIPELINE_DETECTOR_MODEL_SHA256"),
        ({"ray_auth_token": ""}, "PIPELINE_RAY_AUTH_TOKEN(_FILE)"),
    ],
)
def test_production_refuses_the_default_redis_user_random_weights_and_unpinned_models(
    change: dict[str, str], named: str
) -> None:
    safe = Settings(
        _env_file=None,
        env="production",
        nats_creds_file="/run/secrets/worker.creds",
        postgres_password="pw",
        redis_url="rediss://pipeline:pw@cache:6379/0",
        detector_model="/models/yolo11n.pt",
        detector_model_sha256="ab" * 32,
        ray_address="ray://head:10001",
        ray_auth_token="t0ken",
    )
    safe.refuse_unsafe(nats=True)
    unsafe = safe.model_copy(update=change)
    with pytest.raises(ConfigError) as refused:
        unsafe.refuse_unsafe(nats=True)
    assert named in str(refused.value)
    if "detector" in next(iter(change)) or "ray" in next(iter(change)):
        # Without frames there is no detector to check.
        no_frames = unsafe.model_copy(update={"domains": (Domain.SECURITY,)})
        no_frames.refuse_unsafe(nats=True)
    with pytest.raises(ValidationError, match="detector_model_sha256"):
        Settings(_env_file=None, detector_model_sha256="ABC")


def test_secrets_can_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pg").write_text("s3cret\n")
    (tmp_path / "tokens").write_text('{"abc": ["read", "operate"]}\n')
    (tmp_path / "nats").write_text("n4ts")
    monkeypatch.setenv("PIPELINE_POSTGRES_PASSWORD_FILE", str(tmp_path / "pg"))
    monkeypatch.setenv("PIPELINE_API_TOKENS_FILE", str(tmp_path / "tokens"))
    monkeypatch.setenv("PIPELINE_NATS_PASSWORD_FILE", str(tmp_path / "nats"))
    settings = Settings(_env_file=None)
    assert settings.postgres_password == "s3cret"
    assert settings.api_tokens == {"abc": ("read", "operate")}
    assert settings.nats_password == "n4ts"
    monkeypatch.setenv("PIPELINE_POSTGRES_PASSWORD", "also")
    with pytest.raises(ValidationError, match="both set"):
        Settings(_env_file=None)
    monkeypatch.delenv("PIPELINE_POSTGRES_PASSWORD")
    monkeypatch.setenv("PIPELINE_POSTGRES_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="PIPELINE_POSTGRES_PASSWORD_FILE: cannot read"):
        Settings(_env_file=None)


def test_nats_options_carry_authentication_and_tls(tmp_path: Path) -> None:
    assert Settings(_env_file=None).nats_options() == {"inbox_prefix": "_INBOX"}
    options = Settings(
        _env_file=None, nats_user="worker", nats_password="pw", nats_url="tls://nats:4222"
    ).nats_options()
    assert options["user"] == "worker" and options["password"] == "pw"
    assert options["tls"].verify_mode.name == "CERT_REQUIRED"
    creds = Settings(_env_file=None, nats_creds_file="/run/w.creds").nats_options()
    assert creds == {"user_credentials": "/run/w.creds", "inbox_prefix": "_INBOX"}


def test_each_user_reads_replies_under_its_own_inbox_prefix() -> None:
    from pipeline.app import broker_options

    worker = Settings(_env_file=None, nats_user="worker", nats_password="p")
    assert worker.nats_options()["inbox_prefix"] == "_INBOX_worker"
    assert broker_options(worker)["inbox_prefix"] == "_INBOX_worker"
    creds = Settings(_env_file=None, nats_creds_file="/w.creds", nats_inbox_prefix="_INBOX_w1")
    assert creds.nats_options()["inbox_prefix"] == "_INBOX_w1"
    with pytest.raises(ValidationError, match="nats_inbox_prefix"):
        Settings(_env_file=None, nats_inbox_prefix="_INBOX.>")


def test_one_way_to_authenticate_to_nats() -> None:
    with pytest.raises(ValidationError, match="PIPELINE_NATS_USER and PIPELINE_NATS_NKEY"):
        Settings(_env_file=None, nats_user="w", nats_password="p", nats_nkey_seed_file="/k.nk")


def test_the_broker_authenticates_as_the_connections_do(tmp_path: Path) -> None:
    from faststream.nats.security import NatsCredentials, NatsNKey, NatsUserPassword

    from pipeline.app import broker_options

    assert broker_options(Settings(_env_file=None)) == {"inbox_prefix": "_INBOX"}
    user = broker_options(Settings(_env_file=None, nats_user="w", nats_password="p"))
    assert isinstance(user["security"], NatsUserPassword)
    nkey = broker_options(Settings(_env_file=None, nats_nkey_seed_file="/run/w.nk"))
    assert isinstance(nkey["security"], NatsNKey) and nkey["security"].seed == "/run/w.nk"
    creds = broker_options(
        Settings(_env_file=None, nats_creds_file="/run/w.creds", nats_url="tls://nats:4222")
    )
    assert isinstance(creds["security"], NatsCredentials)
    assert creds["security"].ssl_context is not None


def test_the_roles_passwords_come_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "writer"
    secret.write_text("w-secret\n")
    settings = Settings(_env_file=None, postgres_writer_password_file=str(secret))
    assert settings.postgres_writer_password == "w-secret"
    assert settings.postgres_role("writer") == "pipeline_writer"
