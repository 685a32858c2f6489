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
