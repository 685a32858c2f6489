"""The read side's commands against real servers: projections, events, replay."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest

from pipeline.app import apply_streams
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.cli import main
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.simulate import Expect, Outgoing, Traffic
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from projections import VIEWS
from schemas import Domain
from streams import Subjects

from .helpers import positions, stored_ids, write_events


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_projections_status_rebuild_and_events(
    env: Settings, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = EventStore(env.eventsourcing_env())
    events = write_events(store, 1000, seed=31)
    store.close()
    assert main(["projections", "status", "--json"]) == 0
    before = {row["view"]: row for row in _json(capsys)}
    assert before["security"]["state"] == "not started"
    assert before["security"]["lag_events"] == 1000
    assert before["security"]["lag_seconds"] > 0

    assert main(["projections", "rebuild", "security", "--json"]) == 0
    rebuilt = _json(capsys)
    assert rebuilt["position"] == 1000 and rebuilt["events"] > 0
    assert main(["projections", "status"]) == 0
    table = capsys.readouterr().out
    assert "security" in table and "running" in table
    assert positions(pg_schema)["security"] == (1000, "running")

    assert main(["projections", "skip", "security", "5"]) == 1
    assert "not stalled at position 5" in capsys.readouterr().err
    assert main(["projections", "rebuild", "nope"]) == 1
    assert "no view 'nope'" in capsys.readouterr().err
    assert main(["projections", "rebuild"]) == 1
    assert "name the views to rebuild, or give --all" in capsys.readouterr().err

    # Every view at once, two processes: a line per view, then the whole.
    assert main(["projections", "rebuild", "--all", "--jobs", "2", "--json"]) == 0
    *views, whole = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [v["view"] for v in views] == whole["views"] == list(VIEWS)
    assert {v["position"] for v in views} == {1000}
    assert whole["events"] == sum(v["events"] for v in views) == 1000
    assert set(positions(pg_schema).values()) == {(1000, "running")}

    chosen = events[10]
    assert main(["events", "get", chosen.message_id]) == 0
    shown = _json(capsys)
    assert shown["event_id"] == str(chosen.event_id)
    assert main(["events", "get", "no-such-message"]) == 1
    assert main(["events", "tail", "--domain", "security", "--limit", "5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and {line["domain"] for line in lines} == {"security"}
    assert [line["position"] for line in lines] == sorted(line["position"] for line in lines)


def test_a_database_that_does_not_answer_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINE_POSTGRES_PORT", "1")
    monkeypatch.setenv("PIPELINE_POSTGRES_CONNECT_TIMEOUT_S", "1")
    monkeypatch.chdir(Path(__file__).parent)
    assert main(["projections", "status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("configuration error: PIPELINE_POSTGRES_HOST and PIPELINE_POSTGRES_PORT")
    assert "Connection refused" in err


@pytest.mark.parametrize(
    "command", [["projections", "status"], ["events", "tail"], ["events", "get", "m-1"]]
)
def test_a_store_without_the_event_table_is_a_clear_error(
    env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    # As the default settings found the machine's own PostgreSQL, not the running demo's.
    monkeypatch.setenv("PIPELINE_POSTGRES_SCHEMA", "no_pipeline_here")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("configuration error: PIPELINE_POSTGRES_SCHEMA: the store at ")
    assert "has no table no_pipeline_here.journal_events" in err


def test_replay_stores_what_is_missing_once_and_leaves_later_messages(
    env: Settings, nats_server: EmbeddedNats, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    subjects = Subjects()
    traffic = Traffic(subjects, domains=(Domain.SECURITY,), seed=41, bad_ratio=0.0)
    sent = [traffic.valid(Domain.SECURITY) for _ in range(300)]
    bad = Outgoing(
        subject=subjects.subject(Domain.SECURITY, 1, "door-7"),
        body=b'{"id": "not-valid", "source": "door-7"}',
        headers={"Nats-Msg-Id": "not-valid"},
        domain=Domain.SECURITY,
        message_id="not-valid",
        expect=Expect.DEAD_LETTER,
    )
    later = [traffic.valid(Domain.SECURITY) for _ in range(20)]

    async def publish() -> datetime:
        nc = await nats.connect(nats_server.url)
        await apply_streams(nc, env)
        js = nc.jetstream()
        for out in [*sent, bad]:
            await js.publish(out.subject, out.body, headers=out.headers)
        await asyncio.sleep(0.05)
        cut = datetime.now(UTC)
        await asyncio.sleep(0.05)
        for out in later:
            await js.publish(out.subject, out.body, headers=out.headers)
        await nc.close()
        return cut

    cut = asyncio.run(publish())
    since = (cut - timedelta(minutes=5)).isoformat()
    assert main(["replay", "security", "--since", since, "--until", cut.isoformat(), "--json"]) == 0
    first = _json(capsys)
    assert first == {
        "domain": "security",
        "messages": 301,
        "stored": 300,
        "duplicates": 0,
        "dead_lettered": 1,
        "already_dead_lettered": 0,
    }
    assert len(stored_ids(pg_schema)) == 300
    assert main(["replay", "security", "--since", "10m", "--json"]) == 0
    again = _json(capsys)
    assert again["stored"] == 20 and again["duplicates"] == 300
    assert again["dead_lettered"] == 0 and again["already_dead_lettered"] == 1
    assert set(stored_ids(pg_schema).values()) == {1}

    # Its summary says what became of each message; a line per message only with --verbose.
    assert main(["replay", "security", "--since", "10m"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == (
        "replayed 321 security messages: 0 stored, 320 stored already, 0 dead-lettered, "
        "1 invalid, already in the DLQ\n"
    )
    assert "dead-lettered (" not in quiet.err, quiet.err
    assert main(["replay", "security", "--since", "10m", "--verbose"]) == 0
    assert "dead-lettered (schema_violation, its letter in the DLQ already)" in (
        capsys.readouterr().err
    )

    async def letters() -> int:
        nc = await nats.connect(nats_server.url)
        found = await DeadLetters(nc.jetstream(), subjects).list()
        await nc.close()
        return len(found)

    assert asyncio.run(letters()) == 1, "the bad message is dead-lettered once"


def test_time_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replay", "security", "--since", "yesterday"])
    assert "neither an ISO 8601 time nor a duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a time means one thing: its offset is given
        main(["replay", "security", "--since", "2026-11-27T10:00:00"])
    assert "has no UTC offset: add one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("process", "missing"),
    [
        ("projections", ["PIPELINE_POSTGRES_PASSWORD"]),
        ("api", ["PIPELINE_POSTGRES_PASSWORD", "PIPELINE_API_TOKENS"]),
        ("worker", ["PIPELINE_NATS_USER", "PIPELINE_POSTGRES_PASSWORD"]),
    ],
)
def test_production_processes_refuse_to_start_without_their_secrets(
    env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    process: str,
    missing: list[str],
) -> None:
    monkeypatch.setenv("PIPELINE_ENV", "production")
    monkeypatch.setenv("PIPELINE_METRICS_PORT", "0")
    assert main(["run", process]) == 2
    error = capsys.readouterr().err
    assert error.startswith("configuration error: PIPELINE_ENV=production: refusing to start")
    assert all(name in error for name in missing), error
