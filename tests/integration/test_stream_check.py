"""A worker does not apply streams: it checks them at start and refuses what it cannot use."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from nats.aio.client import Client

from pipeline.app import Worker, apply_streams_once
from pipeline.errors import ConfigError
from pipeline.settings import Settings


async def test_a_worker_refuses_streams_nobody_applied_and_creates_none(
    settings: Settings, nc: Client
) -> None:
    with pytest.raises(ConfigError, match="pipeline streams apply") as refused:
        async with Worker(settings):
            pass
    assert "stream SECURITY does not exist" in str(refused.value)
    assert "consumer SECURITY/pipeline-security does not exist" in str(refused.value)
    assert await nc.jsm().streams_info() == []


async def test_a_worker_refuses_a_consumer_that_drifted(settings: Settings, nc: Client) -> None:
    await apply_streams_once(settings)
    jsm = nc.jsm()
    consumer = (await jsm.consumer_info("METRICS", "pipeline-metrics")).config
    await jsm.add_consumer("METRICS", dataclasses.replace(consumer, max_deliver=2))
    with pytest.raises(ConfigError, match=r"consumer METRICS/pipeline-metrics: max_deliver: 2 -> "):
        async with Worker(settings):
            pass
    assert (await jsm.consumer_info("METRICS", "pipeline-metrics")).config.max_deliver == 2


async def test_an_operators_retention_is_reported_not_overwritten(
    settings: Settings, nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await apply_streams_once(settings)
    jsm = nc.jsm()
    stream = (await jsm.stream_info("MONITORING")).config
    await jsm.update_stream(dataclasses.replace(stream, max_age=3600.0))
    with caplog.at_level(logging.WARNING, logger="pipeline.app"):
        async with Worker(settings):
            pass
    assert (await jsm.stream_info("MONITORING")).config.max_age == 3600.0
    assert any("stream MONITORING: max_age" in r.getMessage() for r in caplog.records)
