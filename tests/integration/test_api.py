"""The query API over real views: auth, filters, cursor pages, events, positions, skip."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import stored_events
from pipeline.settings import Settings
from pipeline.store.eventstore import Accepted, EventStore
from projections.queries import Queries, encode_cursor
from projections.service import ProjectionService
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, wait_until
from .helpers import views_current, write_events

READ = {"Authorization": "Bearer reader-token"}
OPERATE = {"Authorization": "Bearer operator-token"}
TOKENS = {"reader-token": ("read",), "operator-token": ("read", "operate")}


@pytest.fixture
def settings(pg_schema: str) -> Settings:
    return make_settings("nats://unused", pg_schema, api_tokens=TOKENS, projections_poll_s=0.5)


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield store
    store.close()


@pytest.fixture
def events(settings: Settings, pg_schema: str, store: EventStore) -> Iterator[list[Accepted]]:
    """2,000 events stored and projected; the projections keep running."""
    service = ProjectionService(as_role(settings, "projector"))
    service.start()
    written = write_events(store, 2000, seed=21)
    asyncio.run(wait_until(lambda: views_current(pg_schema), timeout_s=60))
    yield written
    service.stop()


@pytest.fixture
def client(settings: Settings, events: list[Accepted]) -> Iterator[TestClient]:
    with TestClient(create_app(as_role(settings, "api"))) as test_client:
        yield test_client


def _all_pages(client: TestClient, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = client.get(path, params=query, headers=READ)
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def test_no_token_a_wrong_token_or_scope_get_json_errors(client: TestClient) -> None:
    none = client.get("/v1/security/events")
    assert none.status_code == 401
    assert none.json()["error"] == "unauthenticated"
    assert none.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/security/events", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]) == (401, "unauthenticated")
    forbidden = client.post("/v1/projections/security/skip?position=1", headers=READ)
    assert (forbidden.status_code, forbidden.json()["error"]) == (403, "forbidden")
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True, "problems": []}
    assert "pipeline_api_requests_total" in client.get("/metrics").text


def test_security_events_page_through_every_event_once(
    client: TestClient, events: list[Accepted]
) -> None:
    expected = {e.message_id for e in events if e.domain is Domain.SECURITY}
    items = _all_pages(client, "/v1/security/events", limit=37)
    assert [i["message_id"] for i in items if i["message_id"] in expected] == [
        i["message_id"] for i in items
    ]
    assert len(items) == len(expected) == len({i["message_id"] for i in items})
    keys = [(i["occurred_at"], i["position"]) for i in items]
    assert keys == sorted(keys, reverse=True), "newest first"
    high = _all_pages(client, "/v1/security/events", severity="high", limit=50)
    assert {i["message_id"] for i in high} == {
        e.message_id
        for e in events
        if e.domain is Domain.SECURITY and e.payload["severity"] == "high"
    }
    zone = events[0].payload.get("zone") if events[0].domain is Domain.SECURITY else "zone-1"
    in_zone = _all_pages(client, "/v1/security/events", zone=zone)
    assert in_zone and all(i["zone"] == zone for i in in_zone)
    bad = client.get("/v1/security/events", params={"cursor": "not-a-cursor"}, headers=READ)
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_cursor")
    invalid = client.get("/v1/security/events", params={"severity": "loud"}, headers=READ)
    assert (invalid.status_code, invalid.json()["error"]) == (400, "invalid_request")


def test_counts_and_totals_add_up(client: TestClient, events: list[Accepted]) -> None:
    security = [e for e in events if e.domain is Domain.SECURITY]
    counts = _all_pages(client, "/v1/security/counts", limit=7)
    assert sum(c["events"] for c in counts) == len(security)
    totals = client.get("/v1/security/totals", params={"by": "zone"}, headers=READ).json()
    assert sum(t["events"] for t in totals) == len(security)


def test_services_metrics_and_cameras(client: TestClient, events: list[Accepted]) -> None:
    services = _all_pages(client, "/v1/services", limit=2)
    assert {(s["service"], s["instance"]) for s in services} == {
        (e.payload["service"], e.payload["instance"])
        for e in events
        if e.domain is Domain.MONITORING
    }
    one = services[0]
    detail = client.get(f"/v1/services/{one['service']}/{one['instance']}", headers=READ).json()
    assert detail["status"] == one["status"] and detail["checks"]
    missing = client.get("/v1/services/nobody/none", headers=READ)
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    transitions = _all_pages(client, "/v1/services/transitions", limit=25)
    assert transitions and [t["position"] for t in transitions] == sorted(
        (t["position"] for t in transitions), reverse=True
    )
    rollups = _all_pages(client, "/v1/metrics/rollups", name="cpu_usage", limit=3)
    samples = sum(
        1
        for e in events
        if e.domain is Domain.METRICS
        for s in e.payload["samples"]
        if s["name"] == "cpu_usage"
    )
    assert sum(r["samples"] for r in rollups) == samples
    labelled = _all_pages(client, "/v1/metrics/rollups", name="queue_depth", limit=1)
    assert labelled and all(r["labels"] == {"queue": "default"} for r in labelled)
    totals = client.get("/v1/metrics/totals", params={"name": "cpu_usage"}, headers=READ).json()
    assert sum(t["samples"] for t in totals) == samples
    cameras = client.get("/v1/cameras", headers=READ).json()
    frames = [e for e in events if e.domain is Domain.FRAMES]
    assert sum(c["frames_analysed"] + c["frames_skipped"] for c in cameras) == len(frames)
    detections = _all_pages(client, "/v1/cameras/detections", limit=5)
    assert sum(d["detections"] for d in detections) == sum(
        len(e.payload.get("detections", [])) for e in frames
    )


def test_one_event_by_event_id_or_message_id(client: TestClient, events: list[Accepted]) -> None:
    chosen = events[5]
    by_message = client.get(f"/v1/events/{chosen.message_id}", headers=READ).json()
    by_event = client.get(f"/v1/events/{chosen.event_id}", headers=READ).json()
    assert by_message == by_event
    assert by_event["event_id"] == str(chosen.event_id)
    assert by_event["domain"] == chosen.domain.value
    assert by_event["position"] > 0
    assert client.get("/v1/events/unknown-id", headers=READ).status_code == 404


def test_positions_and_a_skip_that_is_refused(client: TestClient) -> None:
    views = client.get("/v1/projections", headers=READ).json()
    assert {v["view"] for v in views} == {"security", "health", "metrics", "cameras"}
    assert all(v["lag_events"] == 0 and v["state"] == "running" for v in views)
    refused = client.post("/v1/projections/security/skip?position=3", headers=OPERATE)
    assert (refused.status_code, refused.json()["error"]) == (409, "not_stalled_there")
    assert client.post("/v1/projections/nope/skip?position=3", headers=OPERATE).status_code == 404


def test_openapi_is_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v1/security/events" in spec["paths"]
    assert "/v1/projections/{name}/skip" in spec["paths"]


def _error(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The body of an error answer, checked to be the one shape with this status and code."""
    body: dict[str, Any] = answer.json()
    assert (answer.status_code, body.get("error")) == (status, code), answer.text
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def test_every_error_is_answered_in_one_shape(client: TestClient) -> None:
    invalid = client.get(
        "/v1/security/events", params={"limit": 0, "severity": "loud"}, headers=READ
    )
    body = _error(invalid, 400, "invalid_request")
    assert [p["loc"] for p in body["problems"]] == [["query", "severity"], ["query", "limit"]]
    assert "severity: " in body["detail"] and "limit: " in body["detail"]
    _error(client.get("/v1/metrics/totals", headers=READ), 400, "invalid_request")  # no name
    _error(client.get("/v1/nothing-here", headers=READ), 404, "not_found")
    _error(client.delete("/v1/cameras", headers=READ), 405, "method_not_allowed")
    spec = client.get("/openapi.json").json()
    answers = spec["paths"]["/v1/security/events"]["get"]["responses"]
    assert "422" not in answers and {"4XX", "5XX"} <= set(answers)


def test_a_time_without_its_offset_is_refused(client: TestClient) -> None:
    """The database would read it in its session's time zone: the answer would depend on it."""
    for name in ("since", "until"):
        naive = client.get(
            "/v1/security/events", params={name: "2026-11-27T10:00:00"}, headers=READ
        )
        body = _error(naive, 400, "invalid_request")
        assert body["problems"][0]["loc"] == ["query", name]
        assert "timezone" in body["detail"]
    for aware in ("2026-11-27T10:00:00Z", "2026-11-27T11:00:00+01:00"):
        answer = client.get("/v1/security/counts", params={"since": aware}, headers=READ)
        assert answer.status_code == 200, answer.text
    naive_cursor = encode_cursor(["2026-11-27T10:00:00", 10**9])
    answer = client.get("/v1/security/events", params={"cursor": naive_cursor}, headers=READ)
    assert "offset" in _error(answer, 400, "bad_cursor")["detail"]


def test_metric_sums_are_exact(
    client: TestClient, store: EventStore, events: list[Accepted], pg_schema: str
) -> None:
    """2^53 + ... : a sum the view holds exactly comes back with every digit, as a string."""
    template = next(e for e in events if e.domain is Domain.METRICS)
    values = [14019849096961616.0, 1.0, 0.1, 0.2]
    store.write(
        [
            replace(
                template,
                message_id=f"exact-{n}",
                payload={
                    **template.payload,
                    "service": "exact-svc",
                    "samples": [{"name": "requests_total", "value": value, "labels": {}}],
                },
            )
            for n, value in enumerate(values)
        ]
    )
    asyncio.run(wait_until(lambda: views_current(pg_schema), timeout_s=30))
    query = {"name": "requests_total", "service": "exact-svc"}
    totals = client.get("/v1/metrics/totals", params=query, headers=READ).json()
    assert [(t["samples"], t["sum"]) for t in totals] == [(4, "14019849096961617.3")]
    rollups = _all_pages(client, "/v1/metrics/rollups", **query)
    assert [r["sum"] for r in rollups] == ["14019849096961617.3"]


def test_an_instance_and_the_list_show_the_same_checks(
    client: TestClient, store: EventStore, events: list[Accepted], pg_schema: str
) -> None:
    template = next(e for e in events if e.domain is Domain.MONITORING)
    reports = [
        ("2026-11-27T10:00:00Z", "ok", [("cache", "ok"), ("db", "ok")]),
        ("2026-11-27T10:01:00Z", "failing", [("db", "failing")]),
    ]
    store.write(
        [
            replace(
                template,
                message_id=f"checks-{n}",
                payload={
                    **template.payload,
                    "service": "checks-svc",
                    "instance": "checks-0",
                    "reported_at": at,
                    "status": status,
                    "checks": [
                        {"name": name, "status": state, "latency_ms": None, "detail": None}
                        for name, state in checks
                    ],
                },
            )
            for n, (at, status, checks) in enumerate(reports)
        ]
    )
    asyncio.run(wait_until(lambda: views_current(pg_schema), timeout_s=30))
    [listed] = _all_pages(client, "/v1/services", service="checks-svc")
    one = client.get("/v1/services/checks-svc/checks-0", headers=READ).json()
    assert one["checks"] == listed["checks"]
    assert [(c["name"], c["status"]) for c in one["checks"]] == [("db", "failing")]
    earlier = [(c["name"], c["status"], c["reported_at"]) for c in one["earlier_checks"]]
    assert earlier == [("cache", "ok", "2026-11-27T10:00:00+00:00")]


def _records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "request_id", None) == request_id]


def test_database_errors_tell_a_code_and_a_request_id_never_the_cause(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings("nats://unused", pg_schema, api_tokens=TOKENS)
    with TestClient(create_app(as_role(settings, "api"))) as client:
        answer = client.get("/v1/security/events", headers=READ)  # no views in the schema
        body = _error(answer, 503, "view_not_ready")
        assert answer.headers["x-request-id"] == body["request_id"]
        assert pg_schema not in answer.text and "relation" not in answer.text
        [record] = _records(caplog, body["request_id"])
        assert f'relation "{pg_schema}.security_events" does not exist' in record.getMessage()
        projector = settings.postgres_role("projector")  # views are its tables
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user=projector, autocommit=True) as conn:
            conn.execute(f'CREATE TABLE "{pg_schema}".security_events (odd int)')
        answer = client.get("/v1/security/events", headers=READ)
        body = _error(answer, 500, "database_error")
        assert "column" not in answer.text and "SELECT" not in answer.text
        [record] = _records(caplog, body["request_id"])
        assert "does not exist" in record.getMessage()
        assert client.get("/healthz").headers["x-request-id"]
    unknown = make_settings(
        "nats://unused",
        pg_schema,
        api_tokens=TOKENS,
        postgres_user="api-secret-user",
        postgres_connect_timeout_s=0.5,
    )
    with TestClient(create_app(unknown)) as client:
        for answer in (client.get("/v1/cameras", headers=READ), client.get("/readyz")):
            body = _error(answer, 503, "database_unavailable")
            assert answer.headers["x-request-id"] == body["request_id"]
            for secret in ("api-secret-user", PG_HOST, "5432", "connection"):
                assert secret not in body["detail"]
            assert _records(caplog, body["request_id"])
        assert body["ready"] is False


def test_a_bug_is_answered_in_the_one_shape_and_logged_with_its_trace(
    pg_schema: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("internal state the client must not see")

    monkeypatch.setattr(Queries, "cameras", broken)
    settings = make_settings("nats://unused", pg_schema, api_tokens=TOKENS)
    with TestClient(create_app(as_role(settings, "api"))) as client:
        answer = client.get("/v1/cameras", headers=READ)
    body = _error(answer, 500, "internal_error")
    assert answer.headers["x-request-id"] == body["request_id"]
    assert "internal state" not in answer.text
    [record] = _records(caplog, body["request_id"])
    assert record.exc_info and "internal state" in record.getMessage()


def test_a_connect_timeout_under_a_second_is_rounded_up_not_down(pg_schema: str) -> None:
    """Whole seconds for libpq, where 0 is no limit: 0.5 s must not become 0."""
    settings = make_settings(
        "nats://unused", pg_schema, api_tokens=TOKENS, postgres_connect_timeout_s=0.5
    )
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    try:
        assert store.write(list(stored_events(5, seed=3, cameras=0))).stored
    finally:
        store.close()
    with TestClient(create_app(as_role(settings, "api"))) as client:
        assert client.get("/readyz").json() == {"ready": True, "problems": []}
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        env = settings.eventsourcing_env()
        for timeout in (
            settings.postgres_connection()["connect_timeout"],
            int(env["POSTGRES_CONNECT_TIMEOUT"]),
        ):
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="timeout"):
                psycopg.connect(
                    host="127.0.0.1", port=port, dbname=PG_DB, connect_timeout=timeout
                ).close()
            assert time.monotonic() - started < 5


def _start_api(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "api"], env=env, stdout=out, stderr=out
        )


async def test_pipeline_run_api_serves_until_sigterm(
    settings: Settings, events: list[Accepted], tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": settings.postgres_role("api"),
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_API_PORT": str(port),
        "PIPELINE_API_TOKENS": '{"reader-token": ["read"]}',
    }
    log = tmp_path / "api.log"
    process = _start_api(env, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def up() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(up, timeout_s=30)
            page = await http.get("/v1/security/events", params={"limit": 5}, headers=READ)
            assert page.status_code == 200 and len(page.json()["items"]) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text()
