"""The incidents API over the real incident tables: list, filter and page, one incident
with its evidence and history, acknowledge and resolve as the caller, errors."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.settings import ApiToken, Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import EventStore
from projections.incidents import load_sites
from projections.incidents.process import IncidentProcess
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, as_role, make_settings
from ..idp import AUDIENCE, ISSUER, SigningKey, access_claims, jwks_file, silent
from .incidents import T0, frame, health, security, sites_file

READ = {"Authorization": "Bearer reader-token"}
OPERATE = {"Authorization": "Bearer operator-token"}
TOKENS = {
    "reader-token": ("read",),
    "operator-token": ApiToken(name="alice", scopes=("read", "operate")),
}
S = timedelta(seconds=1)


IDP = SigningKey.rsa("idp-1")


@pytest.fixture
def settings(pg_schema: str, tmp_path: Path) -> Settings:
    """Static tokens, and access tokens of the test's identity provider (a JWKS file)."""
    return make_settings(
        "nats://unused",
        pg_schema,
        api_tokens=TOKENS,
        sites_file=str(sites_file(tmp_path)),
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_file=str(jwks_file(tmp_path, IDP)),
    )


class Follower:
    """The incident process, stepped to the head of the store on demand (as the projector)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = IncidentProcess(load_sites(settings.sites_file), settings.postgres_schema)

    def catch_up(self) -> None:
        user = as_role(self.settings, "projector").postgres_user
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user=user, autocommit=True) as conn:
            self.process.prepare(conn)
            self.process.catch_up(conn)


@pytest.fixture
def follower(settings: Settings) -> Follower:
    return Follower(settings)


@pytest.fixture
def client(settings: Settings, follower: Follower) -> Iterator[TestClient]:
    """Three incidents: a forced door with a person (critical), a service down (high),
    a burst of rejected badges (medium)."""
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    later = T0 + 10 * S
    store.write(
        [
            security("door", T0, "door.forced", "high", "door-1", later),
            frame("person", T0 + 12 * S, "cam-1", [("person", 0.91)], later),
            health("down", T0 + 3 * S, "auth", "down", later),
            *(
                security(f"badge-{i}", T0 + 20 * i * S, "badge.rejected", "low", "gate", later)
                for i in range(3)
            ),
        ]
    )
    store.close()
    follower.catch_up()
    with TestClient(create_app(as_role(settings, "api"))) as test_client:
        yield test_client


def _pages(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        answer = client.get("/v1/incidents", params=query, headers=READ)
        assert answer.status_code == 200, answer.text
        items += answer.json()["items"]
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            return items


def _error(answer: Any, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == code
    assert answer.json()["detail"]


def test_incidents_are_listed_most_urgent_first_filtered_and_paged(client: TestClient) -> None:
    whole = client.get("/v1/incidents", headers=READ).json()
    assert whole["next_cursor"] is None
    assert [i["rule"] for i in whole["items"]] == [
        "forced-door-with-person",
        "service-down",
        "badge-rejected-burst",
    ]
    assert _pages(client, limit=1) == whole["items"]
    assert [i["rule"] for i in _pages(client, level="critical")] == ["forced-door-with-person"]
    assert [i["zone"] for i in _pages(client, zone="hq/servers", limit=1)] == ["hq/servers"]
    assert _pages(client, state="resolved") == []
    assert _pages(client, since=(T0 + timedelta(hours=1)).isoformat()) == []
    assert len(_pages(client, since=T0.isoformat(), state="open", limit=2)) == 3
    _error(client.get("/v1/incidents", params={"cursor": "nope"}, headers=READ), 400, "bad_cursor")
    _error(
        client.get("/v1/incidents", params={"level": "dire"}, headers=READ), 400, "invalid_request"
    )
    _error(client.get("/v1/incidents"), 401, "unauthenticated")


def test_one_incident_comes_with_its_evidence(client: TestClient) -> None:
    (forced,) = _pages(client, level="critical")
    answer = client.get(f"/v1/incidents/{forced['incident_id']}", headers=READ)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    door, person = event_id(Domain.SECURITY, "door"), event_id(Domain.FRAMES, "person")
    assert set(found["evidence"]) == {str(door), str(person)}
    events = {e["event_id"]: e for e in found["evidence_events"]}
    assert events[str(door)]["payload"]["kind"] == "door.forced"
    (detection,) = events[str(person)]["payload"]["detections"]
    assert (detection["label"], detection["confidence"]) == ("person", 0.91)
    assert [h["kind"] for h in found["history"]] == ["IncidentOpened", "Assessed"]
    assert found["history"][1]["reasons"] == found["reasons"]
    bare = client.get(f"/v1/incidents/{forced['incident_id']}?events=false", headers=READ)
    assert bare.json()["evidence_events"] == []
    _error(client.get(f"/v1/incidents/{uuid.uuid4()}", headers=READ), 404, "not_found")
    _error(client.get("/v1/incidents/not-an-id", headers=READ), 400, "invalid_request")


def test_operators_acknowledge_and_resolve_as_themselves_once(
    client: TestClient, follower: Follower
) -> None:
    (down,) = _pages(client, zone="hq/servers")
    path = f"/v1/incidents/{down['incident_id']}"
    _error(client.post(f"{path}/acknowledge", json={"note": "x"}, headers=READ), 403, "forbidden")
    acked = client.post(f"{path}/acknowledge", json={"note": "on my way"}, headers=OPERATE)
    assert acked.status_code == 200, acked.text
    assert acked.json()["kind"] == "Acknowledged"
    assert (acked.json()["by"], acked.json()["note"]) == ("alice", "on my way")
    _error(client.post(f"{path}/acknowledge", headers=OPERATE), 409, "already_done")
    _error(
        client.post(f"{path}/acknowledge", json={"nope": 1}, headers=OPERATE),
        400,
        "invalid_request",
    )
    resolved = client.post(f"{path}/resolve", json={"note": "restarted"}, headers=OPERATE)
    assert (resolved.status_code, resolved.json()["by"]) == (200, "alice")
    _error(client.post(f"{path}/resolve", headers=OPERATE), 409, "already_done")
    _error(client.post(f"/v1/incidents/{uuid.uuid4()}/resolve", headers=OPERATE), 404, "not_found")
    follower.catch_up()  # the process takes the actions in (the read model's state)
    found = client.get(path, headers=READ).json()
    assert (found["state"], found["acknowledged_by"], found["resolved_by"]) == (
        "resolved",
        "alice",
        "alice",
    )
    assert found["resolved_note"] == "restarted"
    actions = [(h["kind"], h["by"], h["note"]) for h in found["history"][-2:]]
    assert actions == [("Acknowledged", "alice", "on my way"), ("Resolved", "alice", "restarted")]
    assert [i["state"] for i in _pages(client)][-1] == "resolved"  # resolved ones last


def test_the_openapi_document_describes_the_incidents_api(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/incidents"]["get"]["parameters"][i]["name"] for i in range(6)) == {
        "state",
        "level",
        "zone",
        "since",
        "limit",
        "cursor",
    }
    ack = paths["/v1/incidents/{incident_id}/acknowledge"]["post"]
    assert {"200", "404", "409"} <= set(ack["responses"])
    assert "requestBody" in ack
    assert "404" in paths["/v1/incidents/{incident_id}"]["get"]["responses"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_an_operator_signed_in_with_the_identity_provider_is_recorded_by_subject(
    client: TestClient,
) -> None:
    (burst,) = [i for i in _pages(client) if i["rule"] == "badge-rejected-burst"]
    path = f"/v1/incidents/{burst['incident_id']}"
    reader = _bearer(IDP.token(access_claims("pipeline:read", "carol")))
    assert client.get(path, headers=reader).status_code == 200
    _error(client.post(f"{path}/acknowledge", headers=reader), 403, "forbidden")
    operator = _bearer(IDP.token(access_claims("openid pipeline:operate", "dave")))
    acked = client.post(f"{path}/acknowledge", json={"note": "looking"}, headers=operator)
    assert (acked.status_code, acked.json()["by"]) == (200, "dave")
    expired = client.get(path, headers=_bearer(IDP.token({"exp": int(time.time()) - 600})))
    _error(expired, 401, "token_expired")
    assert expired.headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="token_expired"'
    )
    forged = client.get(path, headers=_bearer(SigningKey.rsa("idp-1").token()))
    _error(forged, 401, "bad_signature")


def test_an_identity_provider_that_hangs_is_answered_503_without_hanging(
    settings: Settings, client: TestClient
) -> None:
    with silent() as url:
        hung = settings.model_copy(
            update={"oidc_jwks_file": "", "oidc_jwks_url": url, "oidc_jwks_timeout_s": 0.5}
        )
        with TestClient(create_app(as_role(hung, "api"))) as hung_client:
            started = time.monotonic()
            answer = hung_client.get("/v1/incidents", headers=_bearer(IDP.token()))
            _error(answer, 503, "idp_unavailable")
            assert answer.headers["retry-after"] == "10"
            again = hung_client.get("/v1/incidents", headers=_bearer(IDP.token()))
            _error(again, 503, "idp_unavailable")
            assert time.monotonic() - started < 3.0
            assert hung_client.get("/v1/incidents", headers=READ).status_code == 200
