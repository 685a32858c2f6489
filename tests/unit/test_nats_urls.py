"""PIPELINE_NATS_URL names one server or a cluster's servers, and a bad entry is named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.app import broker_options
from pipeline.settings import Settings, nats_server_urls

CLUSTER = "nats://n1:4222,nats://n2:4222,nats://n3:4222"


def test_one_url_is_a_list_of_one() -> None:
    assert Settings(_env_file=None).nats_servers() == ["nats://127.0.0.1:4222"]
    assert nats_server_urls("tls://nats.internal") == ["tls://nats.internal"]


def test_a_comma_separated_list_names_every_server_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_NATS_URL", "nats://n1:4222, nats://n2:4222 ,nats://n3:4222")
    settings = Settings(_env_file=None)
    assert settings.nats_servers() == CLUSTER.split(",")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", r"entry 1 \(''\) is empty"),
        ("nats://n1:4222,", r"entry 2 \(''\) is empty"),
        ("nats://n1:4222,,nats://n3:4222", r"entry 2 \(''\) is empty"),
        ("nats://n1:4222,n2:4222", r"entry 2 \('n2:4222'\) does not start with nats://"),
        ("http://n1:4222", r"entry 1 .* does not start with nats://, tls://"),
        ("nats://n1:4222,nats://n2:42x2", r"entry 2 .* port that is not a number"),
        ("nats://n1:99999", r"entry 1 .* port that is not a number"),
        ("nats://:4222", r"entry 1 .* names no host"),
        ("nats://n1:0", r"entry 1 .* port 0"),
        ("nats://n1:4222/streams", r"entry 1 .* path"),
        ("nats://n1:4222;nats://n2:4222", r"entry 1 .* port that is not a number"),
    ],
)
def test_a_malformed_entry_is_named(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=f"PIPELINE_NATS_URL: {message}"):
        Settings(_env_file=None, nats_url=value)


def test_tls_is_all_or_nothing_across_the_list() -> None:
    with pytest.raises(ValidationError, match="some servers are tls:// and some are not"):
        Settings(_env_file=None, nats_url="tls://n1:4222,nats://n2:4222")
    with pytest.raises(ValidationError, match=r"websocket .* and plain"):
        Settings(_env_file=None, nats_url="wss://n1:443,tls://n2:4222")
    secure = Settings(_env_file=None, nats_url="tls://n1:4222,tls://n2:4222")
    assert secure.nats_tls() is not None
    assert secure.nats_options()["tls"].verify_mode.name == "CERT_REQUIRED"
    assert broker_options(secure)["security"].ssl_context is not None
    assert Settings(_env_file=None, nats_url=CLUSTER).nats_tls() is None
