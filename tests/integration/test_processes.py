"""`PIPELINE_PROCESSES=2 pipeline run worker`: two processes share the consumers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app import apply_streams
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import Expect, Outgoing, Traffic, publish
from pipeline.settings import Settings
from streams import Subjects

from ..conftest import PG_DB, PG_HOST, wait_until
from .helpers import stored_ids


def _consumed(port: int) -> float:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name == "pipeline_messages_consumed_total"
    )


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "worker"], env=env, stdout=out, stderr=out
        )


async def test_two_processes_share_the_work_and_stop_on_sigterm(
    settings: Settings, pg_schema: str, nc: Client, tmp_path: Path
) -> None:
    await apply_streams(nc, settings)
    ledger: list[Outgoing] = []
    traffic = Traffic(Subjects(), seed=12, bad_ratio=0.0)
    await publish(nc.jetstream(), iter(traffic), count=6000, on_published=ledger.append)
    unique = {(o.domain, o.message_id) for o in ledger if o.expect is Expect.STORE}

    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_NATS_URL": settings.nats_url,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": "pipeline_writer",
        "PIPELINE_POSTGRES_SCHEMA": pg_schema,
        "PIPELINE_BATCH_SIZE": "32",
        "PIPELINE_ACK_WAIT_S": str(settings.ack_wait_s),  # as the streams were applied
        "PIPELINE_PROCESSES": "2",
        "PIPELINE_DOMAINS": '["security", "monitoring", "metrics"]',
        "PIPELINE_METRICS_PORT": str(port),
    }
    log = tmp_path / "workers.log"
    proc = _start(env, log)
    try:
        await wait_until(lambda: len(stored_ids(pg_schema)) == len(unique), timeout_s=90)
        assert _consumed(port) > 0 and _consumed(port + 1) > 0, log.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(stored_ids(pg_schema).values()) == {1}
