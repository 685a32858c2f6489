"""The `pipeline` command against a real NATS server and PostgreSQL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from nats.aio.client import Client

from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops import cli
from pipeline.ops.cli import main
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.simulate import Traffic
from pipeline.settings import Settings
from schemas import Domain

from ..conftest import running_worker, wait_until
from .helpers import stored_rows


def test_streams_apply_is_idempotent_and_reports_drift(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["streams", "apply"]) == 0
    first = capsys.readouterr().out
    assert "stream SECURITY: created" in first
    assert "consumer SECURITY/pipeline-security: created" in first

    assert main(["streams", "apply"]) == 0
    second = capsys.readouterr().out
    assert "created" not in second and "updated" not in second
    assert second.count("unchanged") == 11  # 6 streams (AUDIT among them), the evidence
    # bucket (OBJ_EVIDENCE), 4 consumers

    monkeypatch.setenv("PIPELINE_MAX_ACK_PENDING", "100")
    assert main(["streams", "apply"]) == 0
    third = capsys.readouterr().out
    assert "consumer SECURITY/pipeline-security: updated (max_ack_pending: 4096 -> 100)" in third

    assert main(["streams", "status"]) == 0
    status = capsys.readouterr().out
    assert "SECURITY: 0 messages" in status
    assert "consumer pipeline-security: pending 0, ack pending 0, redelivered 0" in status


async def test_dlq_list_show_requeue_purge(
    env: Settings, pg_schema: str, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    js = nc.jetstream()
    async with running_worker(env) as worker:
        traffic = Traffic(worker.subjects, seed=8)
        good = traffic.valid(Domain.SECURITY)
        broken = good.body.replace(b'"severity": "', b'"severity": "apocalyptic-')
        await js.publish(good.subject, broken, headers=good.headers)
        bad = traffic.bad("schema_violation")  # a metrics message
        await js.publish(bad.subject, bad.body, headers=bad.headers)
        letters = DeadLetters(js, worker.subjects)

        async def two_letters() -> bool:
            return len(await letters.list()) == 2

        await wait_until(two_letters)
        first = next(x for x in await letters.list() if x.subject.startswith("security."))

        # The CLI runs its own event loop: call its coroutine here instead of main().
        await cli._dlq(_args(action="list", domain=None, limit=100, all=False))
        listing = capsys.readouterr().out
        assert "schema_violation" in listing and listing.endswith("\n2 dead letter(s)\n")
        # A page shorter than the whole says so, and how to see the rest.
        await cli._dlq(_args(action="list", domain=None, limit=1, all=False))
        page = capsys.readouterr().out
        assert page.count("\n#") + page.startswith("#") == 1, page
        assert page.endswith("showing 1 of 2 dead letter(s); --limit N or --all for more\n")
        await cli._dlq(_args(action="list", domain="metrics", limit=100, all=False))
        assert capsys.readouterr().out.endswith("\n1 metrics dead letter(s)\n")
        await cli._dlq(_args(action="list", domain=None, limit=1, all=True))
        assert capsys.readouterr().out.endswith("\n2 dead letter(s)\n")

        await cli._dlq(_args(action="show", seq=first.dlq_seq))
        shown = capsys.readouterr().out
        assert "severity" in shown and "apocalyptic" in shown

        # Fix nothing, requeue: it is dead-lettered again, proving the round trip.
        await cli._dlq(_args(action="requeue", seq=[first.dlq_seq]))
        assert "requeued to security.v1." in capsys.readouterr().out

        async def requeued_and_rejected_again() -> bool:
            found = await letters.list()
            return len(found) == 2 and first.dlq_seq not in {f.dlq_seq for f in found}

        await wait_until(requeued_and_rejected_again)

        await cli._dlq(_args(action="purge", domain="security", yes=True))
        assert len(await letters.list()) == 1
        assert stored_rows(pg_schema) == []


def _args(**values: object) -> argparse.Namespace:
    return argparse.Namespace(**values)


def test_schemas_export_writes_json_schema_and_asyncapi(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schemas", "export", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "asyncapi.json",
        "event.CameraFrame.FrameAnalyzed.v1.json",
        "event.CameraFrame.FrameSkipped.v1.json",
        "event.HealthReport.Recorded.v2.json",
        "event.MetricsBatch.Recorded.v2.json",
        "event.SecurityEvent.Recorded.v2.json",
        "frames.v1.json",
        "metrics.v1.json",
        "monitoring.v1.json",
        "monitoring.v2.json",
        "openapi.json",
        "security.v1.json",
    ]
    openapi = json.loads((tmp_path / "openapi.json").read_text())
    assert "/v1/security/events" in openapi["paths"]
    spec = json.loads((tmp_path / "asyncapi.json").read_text())
    addresses = {c["address"] for c in spec["channels"].values()}
    assert addresses == {"frames.>", "security.>", "monitoring.>", "metrics.>"}
    security = json.loads((tmp_path / "security.v1.json").read_text())
    assert "occurred_at" in security["required"]
    analyzed = json.loads((tmp_path / "event.CameraFrame.FrameAnalyzed.v1.json").read_text())
    assert {"frame", "detections", "model"} <= set(analyzed["required"])
    recorded = json.loads((tmp_path / "event.SecurityEvent.Recorded.v2.json").read_text())
    assert "occurred_at" in recorded["required"]
    assert not {"id", "schema_version"} & set(recorded["properties"])


def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], nats_server: EmbeddedNats
) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.setenv("PIPELINE_BATCH_SIZE", "lots")
    assert main(["streams", "status"]) == 2
    assert "PIPELINE_BATCH_SIZE" in capsys.readouterr().err


def test_a_dlq_list_on_a_nats_without_the_pipeline_s_streams_says_so(
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.setenv("PIPELINE_NATS_URL", nats_server.url)
    assert main(["dlq", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"NATS at {nats_server.url} has no stream DLQ" in err and "PIPELINE_NATS_URL" in err


def test_unreachable_nats_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(Path(__file__).parent)
    monkeypatch.setenv("PIPELINE_NATS_URL", "nats://127.0.0.1:1")
    assert main(["streams", "status"]) == 2
    assert "PIPELINE_NATS_URL" in capsys.readouterr().err
