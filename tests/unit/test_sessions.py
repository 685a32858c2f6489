"""The dashboard's browser sessions: cookies signed and read back, refused when tampered
with, expired, signed by another key or opened with a token since withdrawn; an access
token's session ends with it; CSRF checks of unsafe requests (token, Origin, Referer,
Sec-Fetch-Site); and the endpoints wired into the application (no database needed)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.requests import Request

from pipeline.api import create_app
from pipeline.api.auth import COOKIE, OPERATE, READ, Authenticator, Principal
from pipeline.api.errors import ApiError
from pipeline.api.sessions import Sessions
from pipeline.settings import ApiToken, Settings

from ..idp import AUDIENCE, ISSUER, SigningKey, access_claims, jwks_file

KEY = b"k" * 32
TOKENS = {"s3cret": ("read",), "ops-s3cret": ApiToken(name="ops-bot", scopes=("read", "operate"))}
IDP = SigningKey.ec("ec-1")


class Clock:
    """Wall-clock seconds the test moves."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


def _settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **{"api_tokens": TOKENS, **overrides})


def _sessions(
    clock: Clock, tokens: dict[str, Any] | None = None, key: bytes = KEY, **options: Any
) -> tuple[Authenticator, Sessions]:
    auth = Authenticator.from_settings(_settings(api_tokens=TOKENS if tokens is None else tokens))
    return auth, Sessions(key, auth.tokens, clock=clock, **options)


def _refused(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as refused:
        call()
    return refused.value


def _request(method: str = "POST", **headers: str) -> Request:
    """A request to http://127.0.0.1:8080/v1/x with these headers (`_` for `-`)."""
    raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "method": method,
        "scheme": "http",
        "server": ("127.0.0.1", 8080),
        "path": "/v1/x",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), *raw],
    }
    return Request(scope)


# -- cookies -----------------------------------------------------------------------------


def test_a_static_token_session_reads_back_as_its_caller_and_holds_no_token() -> None:
    clock = Clock()
    auth, sessions = _sessions(clock, max_age_s=3600)
    session, value = sessions.open(auth.authenticate("ops-s3cret"), "ops-s3cret")
    payload = value.partition(".")[0]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert "s3cret" not in value and "s3cret" not in json.dumps(claims)
    assert set(claims) == {"v", "sid", "m", "ref", "iat", "exp"}
    again = sessions.read(value)
    assert again.principal == Principal("ops-bot", frozenset({"read", "operate"}), "token")
    assert again.session_id == session.session_id and again.csrf_token == session.csrf_token
    assert again.expires_at.timestamp() == clock.now + 3600
    header = sessions.cookie(session, value)
    assert header.startswith(f"{COOKIE}={value}; ")
    assert set(header.split("; ")[1:]) == {
        "Max-Age=3600",
        "Path=/",
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
    }
    # Each sign-in is a session of its own, with its own CSRF token.
    other, _ = sessions.open(auth.authenticate("ops-s3cret"), "ops-s3cret")
    assert other.csrf_token != session.csrf_token


def _tampered(value: str) -> list[str]:
    payload, _, mac = value.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = {**claims, "exp": claims["exp"] + 10**6}
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    return [
        f"{forged_payload}.{mac}",  # a later end, the old MAC
        f"{payload}.{flipped}",
        payload,  # no MAC
        f"{payload}.",
        "",
        "not a cookie at all",
        f"{payload}.{mac}x",
        f"{payload}.é",
    ]


def test_a_tampered_cookie_is_refused_and_cleared() -> None:
    auth, sessions = _sessions(Clock())
    _, value = sessions.open(auth.authenticate("s3cret"), "s3cret")
    for bad in _tampered(value):
        refused = _refused(lambda bad=bad: sessions.read(bad))  # type: ignore[misc]
        assert (refused.status, refused.code) == (401, "session_invalid"), bad
        assert refused.headers["Set-Cookie"].startswith(f"{COOKIE}=; Max-Age=0; Path=/")


def test_a_cookie_signed_with_another_key_is_refused() -> None:
    clock = Clock()
    auth, sessions = _sessions(clock)
    _, value = sessions.open(auth.authenticate("s3cret"), "s3cret")
    _, restarted = _sessions(clock, key=b"another key, as after a restart!")
    refused = _refused(lambda: restarted.read(value))
    assert refused.code == "session_invalid" and "PIPELINE_API_SESSION_KEY" in refused.detail
    _, same_key = _sessions(clock)  # another replica, or a restart, with the same key
    assert same_key.read(value).principal.scopes == {"read"}


def test_a_session_ends_at_its_max_age() -> None:
    clock = Clock()
    auth, sessions = _sessions(clock, max_age_s=600)
    _, value = sessions.open(auth.authenticate("s3cret"), "s3cret")
    clock.now += 599
    sessions.read(value)
    clock.now += 1
    refused = _refused(lambda: sessions.read(value))
    assert (refused.status, refused.code) == (401, "session_expired")
    assert "Max-Age=0" in refused.headers["Set-Cookie"]


def test_a_static_token_withdrawn_or_changed_ends_its_sessions_or_changes_them() -> None:
    clock = Clock()
    auth, sessions = _sessions(clock)
    _, value = sessions.open(auth.authenticate("ops-s3cret"), "ops-s3cret")
    # The settings change (the API restarts with the same key): the token is gone.
    _, without = _sessions(clock, tokens={"s3cret": ("read",)})
    refused = _refused(lambda: without.read(value))
    assert refused.code == "session_invalid" and "no longer accepted" in refused.detail
    # The token stays but loses a scope and is renamed: the session follows it.
    renamed = {"ops-s3cret": ApiToken(name="ops-robot", scopes=("read",))}
    _, changed = _sessions(clock, tokens=renamed)
    assert changed.read(value).principal == Principal("ops-robot", frozenset({"read"}), "token")


def _oidc(tmp_path: Path, clock: Clock, **overrides: Any) -> tuple[Authenticator, Sessions]:
    settings = _settings(
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_file=str(jwks_file(tmp_path, IDP)),
        **overrides,
    )
    auth = Authenticator.from_settings(settings)
    return auth, Sessions(KEY, auth.tokens, issuer=settings.oidc_issuer, clock=clock)


def test_an_access_token_session_ends_with_the_token(tmp_path: Path) -> None:
    clock = Clock()
    auth, sessions = _oidc(tmp_path, clock)
    claims = access_claims("openid pipeline:operate", "dave")
    clock.now = claims["iat"]
    token = IDP.token(claims)
    session, value = sessions.open(auth.authenticate(token), token)
    assert session.expires_at.timestamp() == claims["exp"]  # 300 s, not the 8 h default
    assert "Max-Age=300;" in sessions.cookie(session, value)
    who = sessions.read(value).principal
    assert who == Principal("dave", frozenset({"read", "operate"}), "oidc", who.expires_at)
    assert token not in value
    clock.now = claims["exp"]
    assert _refused(lambda: sessions.read(value)).code == "session_expired"
    # An identity provider no longer trusted ends its sessions.
    clock.now = claims["iat"]
    elsewhere = Sessions(KEY, auth.tokens, issuer="https://other.example.test", clock=clock)
    assert _refused(lambda: elsewhere.read(value)).code == "session_invalid"
    without_oidc = Sessions(KEY, auth.tokens, clock=clock)
    assert _refused(lambda: without_oidc.read(value)).code == "session_invalid"


def test_an_access_token_past_its_exp_within_the_leeway_opens_no_session(
    tmp_path: Path,
) -> None:
    clock = Clock()
    auth, sessions = _oidc(tmp_path, clock)
    claims = access_claims()
    clock.now = claims["iat"] + 310  # expired 10 s ago: accepted with 30 s of leeway
    token = IDP.token(claims)
    assert auth.authenticate(token).subject == "carol"
    refused = _refused(lambda: sessions.open(auth.authenticate(token), token))
    assert (refused.status, refused.code) == (401, "token_expired")


# -- CSRF --------------------------------------------------------------------------------


@pytest.fixture
def session_and_sessions() -> tuple[Any, Sessions]:
    auth, sessions = _sessions(Clock(), origins=("https://ops.example.test",))
    session, _ = sessions.open(auth.authenticate("ops-s3cret"), "ops-s3cret")
    return session, sessions


OURS = "http://127.0.0.1:8080"


def test_an_unsafe_request_with_its_token_from_our_origin_passes(
    session_and_sessions: tuple[Any, Sessions],
) -> None:
    session, sessions = session_and_sessions
    token = session.csrf_token
    for headers in (
        {"origin": OURS},
        {"origin": "HTTP://127.0.0.1:8080"},
        {"referer": f"{OURS}/"},  # no Origin: the Referer's origin
        {"origin": OURS, "sec_fetch_site": "same-origin"},
        {"origin": "https://ops.example.test"},  # configured (behind a proxy)
        {"origin": "https://ops.example.test:443"},
    ):
        sessions.check_request(_request(x_csrf_token=token, **headers), session)


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"origin": OURS}, "has no X-CSRF-Token"),
        ({"origin": OURS, "x_csrf_token": "wrong"}, "has the wrong X-CSRF-Token"),
        ({"origin": OURS, "x_csrf_token": "OTHER"}, "has the wrong X-CSRF-Token"),
        ({"x_csrf_token": "TOKEN"}, "neither Origin nor Referer"),
        ({"origin": "https://evil.example.test", "x_csrf_token": "TOKEN"}, "another origin"),
        ({"origin": "http://127.0.0.1:8081", "x_csrf_token": "TOKEN"}, "another origin"),
        ({"origin": "https://127.0.0.1:8080", "x_csrf_token": "TOKEN"}, "another origin"),
        ({"origin": "http://localhost:8080", "x_csrf_token": "TOKEN"}, "another origin"),
        ({"origin": "null", "x_csrf_token": "TOKEN"}, "another origin"),
        ({"referer": "https://evil.example.test/x", "x_csrf_token": "TOKEN"}, "another origin"),
        (
            {"origin": OURS, "sec_fetch_site": "same-site", "x_csrf_token": "TOKEN"},
            "same-site page",
        ),
        (
            {"origin": OURS, "sec_fetch_site": "cross-site", "x_csrf_token": "TOKEN"},
            "cross-site page",
        ),
    ],
)
def test_an_unsafe_request_without_its_token_or_from_elsewhere_is_refused(
    session_and_sessions: tuple[Any, Sessions], headers: dict[str, str], says: str
) -> None:
    session, sessions = session_and_sessions
    other, _ = sessions.open(Principal("x", frozenset(), "token"), "s3cret")
    swap = {"TOKEN": session.csrf_token, "OTHER": other.csrf_token}
    given = {k: swap.get(v, v) for k, v in headers.items()}
    refused = _refused(lambda: sessions.check_request(_request(**given), session))
    assert (refused.status, refused.code) == (403, "csrf_failed")
    assert says in refused.detail


def test_sign_in_refuses_a_browser_on_another_origin_and_lets_other_clients_in(
    session_and_sessions: tuple[Any, Sessions],
) -> None:
    _, sessions = session_and_sessions
    sessions.check_origin(_request())  # curl: no Origin, no Referer
    sessions.check_origin(_request(origin=OURS))
    refused = _refused(lambda: sessions.check_origin(_request(origin="https://evil.test")))
    assert refused.code == "csrf_failed"


# -- settings ----------------------------------------------------------------------------


def test_the_session_key_comes_from_the_environment_or_a_file_and_is_long_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match="PIPELINE_API_SESSION_KEY: at least 32"):
        Settings(_env_file=None, api_session_key="short")
    secret = tmp_path / "session-key"
    secret.write_text("f" * 64 + "\n")
    monkeypatch.setenv("PIPELINE_API_SESSION_KEY_FILE", str(secret))
    assert Settings(_env_file=None).api_session_key == "f" * 64
    monkeypatch.setenv("PIPELINE_API_SESSION_KEY", "e" * 64)
    with pytest.raises(ValidationError, match="both set"):
        Settings(_env_file=None)


def test_session_origins_are_origins() -> None:
    with pytest.raises(ValidationError, match="PIPELINE_API_SESSION_ORIGINS"):
        Settings(_env_file=None, api_session_origins=("https://ops.example.test/dashboard",))
    with pytest.raises(ValidationError, match="PIPELINE_API_SESSION_ORIGINS"):
        Settings(_env_file=None, api_session_origins=("ops.example.test",))


def test_without_a_key_each_application_signs_with_its_own() -> None:
    settings = _settings()
    first, second = (
        Sessions.from_settings(settings, Authenticator.from_settings(settings).tokens)
        for _ in range(2)
    )
    session, value = first.open(Principal("token-x", frozenset({"read"}), "token"), "s3cret")
    assert first.read(value).session_id == session.session_id
    assert _refused(lambda: second.read(value)).code == "session_invalid"


# -- the endpoints, wired into the application ---------------------------------------------


ORIGIN = {"Origin": "http://testserver"}


@pytest.fixture
def client() -> TestClient:
    """The API application (never started: nothing here uses the database), with two
    endpoints that need the `read` and `operate` scopes."""
    app = create_app(_settings(api_session_key="s" * 32))

    def whoami() -> str:
        return "ok"

    app.add_api_route("/v1/probe", whoami, methods=["GET"], dependencies=READ)
    app.add_api_route("/v1/probe", whoami, methods=["POST"], dependencies=OPERATE)
    return TestClient(app)


def _signed_in(client: TestClient, token: str) -> tuple[dict[str, str], str]:
    answer = client.post("/v1/session", headers={"Authorization": f"Bearer {token}", **ORIGIN})
    assert answer.status_code == 200, answer.text
    set_cookie = answer.headers["set-cookie"]
    assert answer.headers["cache-control"] == "no-store"
    value = set_cookie.split(";")[0].removeprefix(f"{COOKIE}=")
    # http://testserver is not a secure origin: the test sends the cookie itself.
    return {"Cookie": f"{COOKIE}={value}"}, answer.json()["csrf_token"]


def test_signed_in_the_cookie_authenticates_and_unsafe_requests_need_csrf(
    client: TestClient,
) -> None:
    cookie, csrf = _signed_in(client, "ops-s3cret")
    info = client.get("/v1/session", headers=cookie).json()
    assert info["subject"] == "ops-bot" and info["scopes"] == ["operate", "read"]
    assert (info["method"], info["csrf_token"]) == ("token", csrf)
    assert client.get("/v1/probe", headers=cookie).status_code == 200
    done = client.post("/v1/probe", headers={**cookie, **ORIGIN, "X-CSRF-Token": csrf})
    assert done.status_code == 200
    for headers in (
        {**cookie, **ORIGIN},
        {**cookie, **ORIGIN, "X-CSRF-Token": csrf[:-1]},
        {**cookie, "X-CSRF-Token": csrf},
        {**cookie, "Origin": "https://evil.example.test", "X-CSRF-Token": csrf},
    ):
        refused = client.post("/v1/probe", headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"] == "csrf_failed", refused.json()
    # A bearer token needs none of it, and wins over a cookie sent beside it.
    assert client.post("/v1/probe", headers={"Authorization": "Bearer ops-s3cret"}).is_success
    with_both = {**cookie, "Authorization": "Bearer s3cret"}
    assert client.post("/v1/probe", headers=with_both).json()["error"] == "forbidden"


def test_a_session_keeps_its_scopes_and_sign_in_needs_read(client: TestClient) -> None:
    cookie, csrf = _signed_in(client, "s3cret")
    refused = client.post("/v1/probe", headers={**cookie, **ORIGIN, "X-CSRF-Token": csrf})
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
    for headers, status, code in (
        ({}, 401, "unauthenticated"),
        ({"Authorization": "Bearer nope"}, 401, "unauthenticated"),
        ({"Authorization": "Bearer s3cret", "Origin": "https://evil.test"}, 403, "csrf_failed"),
    ):
        answer = client.post("/v1/session", headers=headers)
        assert (answer.status_code, answer.json()["error"]) == (status, code)
        assert "set-cookie" not in answer.headers


def test_without_a_session_or_with_a_stale_one(client: TestClient) -> None:
    assert client.get("/v1/session").json()["error"] == "unauthenticated"
    stale = client.get("/v1/probe", headers={"Cookie": f"{COOKIE}=eyJ2IjoxfQ.bm9wZQ"})
    assert (stale.status_code, stale.json()["error"]) == (401, "session_invalid")
    assert stale.headers["set-cookie"].startswith(f"{COOKIE}=; Max-Age=0")


def test_sign_out_clears_the_cookie_and_needs_the_csrf_token(client: TestClient) -> None:
    cookie, csrf = _signed_in(client, "s3cret")
    refused = client.delete("/v1/session", headers={**cookie, **ORIGIN})
    assert (refused.status_code, refused.json()["error"]) == (403, "csrf_failed")
    done = client.delete("/v1/session", headers={**cookie, **ORIGIN, "X-CSRF-Token": csrf})
    assert done.status_code == 204
    assert done.headers["set-cookie"] == Sessions.clearing()
    # A cookie that opens no session any more is cleared without more ado.
    gone = client.delete("/v1/session", headers={"Cookie": f"{COOKIE}=x.y"})
    assert gone.status_code == 204 and "Max-Age=0" in gone.headers["set-cookie"]


def test_the_openapi_document_names_both_ways_in(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["session"] == {
        "type": "apiKey",
        "in": "cookie",
        "name": COOKIE,
        "description": schemes["session"]["description"],
    }
    assert {"post", "get", "delete"} <= set(document["paths"]["/v1/session"])
