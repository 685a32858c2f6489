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


def test_eventsourcing_environment_is_complete() -> None:
    env = Settings(_env_file=None, postgres_schema="s1").eventsourcing_env()
    assert env["PERSISTENCE_MODULE"] == "eventsourcing.postgres"
    assert env["POSTGRES_SCHEMA"] == "s1"
    assert env["POSTGRES_PASSWORD"] == ""


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
