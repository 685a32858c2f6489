"""The dashboard's browser sessions: a signed cookie in place of the bearer token, and
the CSRF checks of the requests it authenticates.

`POST /v1/session` (`routes.session`) takes a bearer token once and answers a cookie,
`HttpOnly` (page scripts cannot read it), `Secure`, `SameSite=Strict` (no other site's
page makes the browser send it), `Path=/`, with a `Max-Age`: `PIPELINE_API_SESSION_MAX_AGE_S`,
and for an access token no later than its `exp`. The cookie is `<payload>.<mac>`: the
payload (base64url JSON) says what the session is and when it ends; the MAC is an
HMAC-SHA256 under a key derived from `PIPELINE_API_SESSION_KEY` (a random key per process
when unset). It never holds the token: a static token is named by a keyed hash of it, so
the session is looked up in `PIPELINE_API_TOKENS` on every request and ends when that
token is withdrawn (its name and scopes are the token's as they are now); an access
token's session holds its subject, scopes and issuer, as verified at sign-in.

A cookie is sent by the browser on its own, so an unsafe request (POST, PUT, PATCH,
DELETE) it authenticates must also prove it comes from the page: an `Origin` (else a
`Referer`) of the API's own origin (or one of `PIPELINE_API_SESSION_ORIGINS`), a
`Sec-Fetch-Site` of `same-origin` if the browser sends one, and an `X-CSRF-Token` header
equal to the session's CSRF token (an HMAC of the session id, handed to the page at
sign-in and by `GET /v1/session`). Else 403 `csrf_failed`. Bearer requests need none
of this: no browser adds an `Authorization` header by itself.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

from ..settings import Settings
from .auth import COOKIE, CSRF_HEADER, Principal, StaticTokens
from .errors import ApiError

__all__ = ["Session", "Sessions"]

log = logging.getLogger("pipeline.api.sessions")

_VERSION = 1
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _invalid(detail: str) -> ApiError:
    """A 401 for a cookie that does not open a session; the answer also clears it."""
    return ApiError(401, "session_invalid", detail, {"Set-Cookie": Sessions.clearing()})


@dataclass(frozen=True)
class Session:
    """A signed-in browser: who (as a `Principal`), since and until when, and the token
    its unsafe requests must carry."""

    principal: Principal
    session_id: str
    issued_at: datetime
    expires_at: datetime
    csrf_token: str


class Sessions:
    """Opens sessions for authenticated callers, reads them back from their cookies, and
    checks the unsafe requests they make (CSRF)."""

    def __init__(
        self,
        key: bytes,
        tokens: StaticTokens,
        *,
        issuer: str = "",
        max_age_s: int = 8 * 3600,
        origins: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        # One key per purpose, so no value made for one is accepted as another.
        self._mac_key = hmac.digest(key, b"pipeline session cookie v1", "sha256")
        self._csrf_key = hmac.digest(key, b"pipeline session csrf v1", "sha256")
        ref_key = hmac.digest(key, b"pipeline session token reference v1", "sha256")
        self._by_ref = {
            _b64(hmac.digest(ref_key, token, "sha256")): principal
            for token, principal in tokens.entries()
        }
        self._ref_key = ref_key
        self.issuer = issuer
        self.max_age_s = max_age_s
        self.origins = frozenset(_origin(o) for o in origins)
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, tokens: StaticTokens) -> Sessions:
        """The sessions of the settings' key (a random one when unset: see the module)."""
        if settings.api_session_key:
            key = settings.api_session_key.encode()
        else:
            key = secrets.token_bytes(32)
            if settings.env == "production":
                log.warning(
                    "PIPELINE_API_SESSION_KEY is not set: the dashboard's sessions are signed "
                    "with a random key and end when this process stops; replicas of the API "
                    "need one key between them"
                )
        return cls(
            key,
            tokens,
            issuer=settings.oidc_issuer,
            max_age_s=settings.api_session_max_age_s,
            origins=settings.api_session_origins,
        )

    # -- opening and reading ------------------------------------------------------------

    def open(self, principal: Principal, token: str) -> tuple[Session, str]:
        """A new session for `principal`, who signed in with `token`, and its cookie's
        value. An access token's session ends with it; `token_expired` if it has."""
        now = int(self._clock())
        expires = now + self.max_age_s
        claims: dict[str, Any] = {
            "v": _VERSION,
            "sid": _b64(secrets.token_bytes(16)),
            "m": principal.method,
        }
        if principal.method == "token":
            claims["ref"] = _b64(hmac.digest(self._ref_key, token.encode(), "sha256"))
        else:
            if principal.expires_at is not None:
                expires = min(expires, int(principal.expires_at.timestamp()))
            if expires <= now:
                raise ApiError(401, "token_expired", "the token has expired: refresh it")
            claims |= {
                "sub": principal.subject,
                "scp": sorted(principal.scopes),
                "iss": self.issuer,
            }
        claims |= {"iat": now, "exp": expires}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        value = f"{payload}.{_b64(self._mac(payload))}"
        return self._session(claims, self._principal(claims)), value

    def read(self, value: str) -> Session:
        """The session of a cookie's value; else 401 `session_invalid` (not one this API
        signed, or its token is no longer accepted) or `session_expired`."""
        payload, _, mac = value.partition(".")
        try:
            given = _unb64(mac)
        except (binascii.Error, ValueError):
            given = b""
        if not hmac.compare_digest(given, self._mac(payload)):
            raise _invalid(
                "the session cookie is not one this API signed (was the API restarted "
                "without PIPELINE_API_SESSION_KEY?): sign in again"
            )
        claims = json.loads(_unb64(payload))
        if not isinstance(claims, dict) or claims.get("v") != _VERSION:
            raise _invalid("the session cookie is of another version: sign in again")
        if int(claims["exp"]) <= self._clock():
            raise ApiError(
                401,
                "session_expired",
                "the session has ended: sign in again",
                {"Set-Cookie": self.clearing()},
            )
        return self._session(claims, self._principal(claims))

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        if claims["m"] == "token":
            found = self._by_ref.get(str(claims["ref"]))
            if found is None:
                raise _invalid("the token this session was opened with is no longer accepted")
            return found
        if not self.issuer or claims.get("iss") != self.issuer:
            raise _invalid("access tokens of this session's identity provider are not accepted")
        expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
        return Principal(str(claims["sub"]), frozenset(claims["scp"]), "oidc", expires)

    def _session(self, claims: Mapping[str, Any], principal: Principal) -> Session:
        sid = str(claims["sid"])
        return Session(
            principal,
            sid,
            datetime.fromtimestamp(int(claims["iat"]), UTC),
            datetime.fromtimestamp(int(claims["exp"]), UTC),
            _b64(hmac.digest(self._csrf_key, sid.encode(), "sha256")),
        )

    def _mac(self, payload: str) -> bytes:
        return hmac.digest(self._mac_key, payload.encode(), "sha256")

    # -- cookies --------------------------------------------------------------------------

    def cookie(self, session: Session, value: str) -> str:
        """The `Set-Cookie` header that gives the browser the session."""
        max_age = max(0, int(session.expires_at.timestamp() - self._clock()))
        return f"{COOKIE}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Strict"

    @staticmethod
    def clearing() -> str:
        """The `Set-Cookie` header that makes the browser drop the session's cookie."""
        return f"{COOKIE}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict"

    # -- CSRF -----------------------------------------------------------------------------

    def check_request(self, request: Request, session: Session | None = None) -> None:
        """Refuse (403 `csrf_failed`) a request a browser may have sent for another site:
        one from another origin, and with `session`, one without its CSRF token."""
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site != "same-origin":
            raise _csrf(f"the browser says the request comes from a {fetch_site} page")
        origin = request.headers.get("origin") or request.headers.get("referer")
        if not origin:
            raise _csrf("the request has neither Origin nor Referer")
        ours = f"{request.url.scheme}://{request.url.netloc}"
        theirs = _origin(origin)
        if not theirs[0] or theirs not in self.origins | {_origin(ours)}:
            raise _csrf(f"the request comes from another origin than {ours}")
        if session is not None:
            given = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
                missing = "has no" if not given else "has the wrong"
                raise _csrf(f"the request {missing} {CSRF_HEADER} header (see GET /v1/session)")

    def check_origin(self, request: Request) -> None:
        """Refuse a request that a browser sent from another origin (one without `Origin`
        and `Referer` is not a browser's, and passes)."""
        if request.headers.get("origin") or request.headers.get("referer"):
            self.check_request(request)


def _csrf(detail: str) -> ApiError:
    return ApiError(403, "csrf_failed", detail)


def _origin(url: str) -> tuple[str, str, int | None]:
    """A URL's origin as (scheme, host, port) with the default port filled in;
    `("", "", None)` for what is not a URL of a host (`null`, garbage)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ("", "", None)
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in _DEFAULT_PORTS:
        return ("", "", None)
    return (scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme])
