"""Browser sessions against the API served as `pipeline run api` serves it, on the real
incident tables: signed in with a static token or an access token, the cookie reads the
server-sent stream and acknowledges an incident (with its CSRF token, from its origin);
without either, or from another origin, refused and nothing is recorded; a session
survives a restart with the same key, and ends when the key or the token goes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.api.auth import COOKIE
from pipeline.ops.embedded import free_port
from pipeline.settings import ApiToken, Settings
from pipeline.store.eventstore import EventStore

from ..conftest import as_role, make_settings
from ..idp import AUDIENCE, ISSUER, SigningKey, access_claims, jwks_file
from .dashboard import SseReader, serving
from .incidents import T0, health, security, sites_file
from .test_api_incidents import Follower

pytestmark = pytest.mark.timeout(120)

S = timedelta(seconds=1)
KEY = "integration-tests-session-key-0123456789"
TOKENS: dict[str, Any] = {
    "reader-token": ("read",),
    "ada-token": ApiToken(name="ada", scopes=("read", "operate")),
}
IDP = SigningKey.rsa("idp-1")


@pytest.fixture
def settings(pg_schema: str, tmp_path: Path) -> Settings:
    return make_settings(
        "nats://unused",
        pg_schema,
        api_tokens=TOKENS,
        api_port=free_port(),
        api_session_key=KEY,
        sites_file=str(sites_file(tmp_path)),
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_file=str(jwks_file(tmp_path, IDP)),
    )


READER = {"Authorization": "Bearer reader-token"}


@pytest.fixture
def incidents(settings: Settings) -> None:
    """Two open incidents: a service down, a burst of rejected badges."""
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    later = T0 + 10 * S
    store.write(
        [
            health("down", T0 + 3 * S, "auth", "down", later),
            *(
                security(f"badge-{i}", T0 + 20 * i * S, "badge.rejected", "low", "gate", later)
                for i in range(3)
            ),
        ]
    )
    store.close()
    Follower(settings).catch_up()


class Browser:
    """An HTTP client that behaves as the page does: signs in once, then sends the cookie
    (httpx keeps no Secure cookie for http://, so it is sent by hand) and its origin."""

    def __init__(self, http: httpx.AsyncClient, origin: str) -> None:
        self.http, self.origin = http, origin
        self.cookie: dict[str, str] = {}
        self.csrf = ""

    async def sign_in(self, token: str) -> httpx.Response:
        answer = await self.http.post(
            "/v1/session", headers={"Authorization": f"Bearer {token}", "Origin": self.origin}
        )
        if answer.is_success:
            attributes = answer.headers["set-cookie"].split("; ")
            name, _, value = attributes[0].partition("=")
            assert name == COOKIE and value
            assert {"Path=/", "Secure", "HttpOnly", "SameSite=Strict"} <= set(attributes)
            self.cookie = {"Cookie": f"{COOKIE}={value}"}
            self.csrf = answer.json()["csrf_token"]
        return answer

    async def open_incidents(self) -> dict[str, str]:
        """The open incidents by rule: their ids (asked with a bearer token)."""
        answer = await self.http.get("/v1/incidents", params={"state": "open"}, headers=READER)
        return {i["rule"]: i["incident_id"] for i in answer.json()["items"]}

    async def acknowledge(self, incident: str, **headers: str) -> httpx.Response:
        sent = {**self.cookie, "Origin": self.origin, "X-CSRF-Token": self.csrf, **headers}
        return await self.http.post(
            f"/v1/incidents/{incident}/acknowledge",
            json={"note": "from the page"},
            headers={k: v for k, v in sent.items() if v},
        )


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[str]:
    async with serving(settings) as served:
        yield served.url


@contextlib.asynccontextmanager
async def _browser(url: str) -> AsyncIterator[Browser]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield Browser(http, url)


def _error(answer: httpx.Response, status: int, code: str) -> None:
    assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text


async def test_the_cookie_reads_the_stream_and_acknowledges_with_its_csrf_token(
    incidents: None, api: str
) -> None:
    async with _browser(api) as page:
        assert (await page.sign_in("ada-token")).json()["subject"] == "ada"
        async with page.http.stream("GET", "/v1/stream", headers=page.cookie) as response:
            assert response.status_code == 200
            first = await SseReader(response).next()
            assert first.event == "snapshot"
            assert len(first.data["sections"]["incidents"]["items"]) == 2
        opened = await page.open_incidents()
        down = opened["service-down"]
        # Refused: no CSRF token, a wrong one, another origin (another site, another port).
        _error(await page.acknowledge(down, **{"X-CSRF-Token": ""}), 403, "csrf_failed")
        _error(await page.acknowledge(down, **{"X-CSRF-Token": "x" * 43}), 403, "csrf_failed")
        evil = await page.acknowledge(down, Origin="https://evil.example.test")
        _error(evil, 403, "csrf_failed")
        port = int(api.rsplit(":", 1)[1])
        sibling = await page.acknowledge(down, Origin=f"http://127.0.0.1:{port + 1}")
        _error(sibling, 403, "csrf_failed")
        # Nothing was recorded: the first acknowledgement is taken, as ada's, once.
        done = await page.acknowledge(down)
        assert (done.status_code, done.json()["by"]) == (200, "ada")
        _error(await page.acknowledge(down), 409, "already_done")
    async with _browser(api) as reader:
        await reader.sign_in("reader-token")
        burst = opened["badge-rejected-burst"]
        _error(await reader.acknowledge(burst), 403, "forbidden")
        # Signed out, the cookie is cleared.
        out = await reader.http.delete(
            "/v1/session",
            headers={**reader.cookie, "Origin": api, "X-CSRF-Token": reader.csrf},
        )
        assert out.status_code == 204 and "Max-Age=0" in out.headers["set-cookie"]


async def test_an_operator_signed_in_with_an_access_token_acts_as_its_subject(
    incidents: None, api: str
) -> None:
    async with _browser(api) as page:
        claims = access_claims("openid pipeline:operate", "dave")
        signed = await page.sign_in(IDP.token(claims))
        assert signed.json()["method"] == "oidc"
        max_age = int(signed.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
        assert max_age <= claims["exp"] - int(time.time()) + 1  # not beyond the token's exp
        burst = (await page.open_incidents())["badge-rejected-burst"]
        done = await page.acknowledge(burst)
        assert (done.status_code, done.json()["by"]) == (200, "dave")
        expired = IDP.token({"exp": int(time.time()) - 600})
        _error(await page.sign_in(expired), 401, "token_expired")
        _error(await page.sign_in(SigningKey.rsa("idp-1").token()), 401, "bad_signature")


async def test_a_session_survives_a_restart_with_its_key_and_ends_with_the_key_or_token(
    settings: Settings,
) -> None:
    async with serving(settings) as served, _browser(served.url) as page:
        await page.sign_in("ada-token")
        cookie = page.cookie
    # The same key (a restart, or another replica): the session goes on.
    async with serving(settings) as served, httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/v1/session", headers=cookie)).json()["subject"] == "ada"
    # Without the token it was opened with: ended, and the cookie cleared.
    withdrawn = settings.model_copy(update={"api_tokens": {"reader-token": ("read",)}})
    async with serving(withdrawn) as served, httpx.AsyncClient(base_url=served.url) as http:
        answer = await http.get("/v1/incidents", headers=cookie)
        _error(answer, 401, "session_invalid")
        assert "no longer accepted" in answer.json()["detail"]
        assert answer.headers["set-cookie"].startswith(f"{COOKIE}=; Max-Age=0")
    # Without the key (a random one per process): ended.
    keyless = settings.model_copy(update={"api_session_key": ""})
    async with serving(keyless) as served, httpx.AsyncClient(base_url=served.url) as http:
        _error(await http.get("/v1/session", headers=cookie), 401, "session_invalid")
