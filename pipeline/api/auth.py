"""Who calls the API and what they may do: static bearer tokens and OIDC access tokens.

Every `/v1` endpoint depends on `needs("read")` or `needs("operate")` (`READ`,
`OPERATE`, or `Operator` when it records who acted). A request without an
`Authorization` header may instead carry the dashboard's session cookie, which names the
caller a bearer token named at sign-in (`pipeline.api.sessions`; its unsafe requests are
checked against CSRF). The bearer token is looked up
among `PIPELINE_API_TOKENS` first; when `PIPELINE_OIDC_ISSUER` is set, a token that is
not one of them is verified as an OAuth 2 / OpenID Connect access token (a JWT): its
signature by a key of the provider's JWKS, `exp`, `nbf`, `iss` and `aud`, an algorithm
from `PIPELINE_OIDC_ALGORITHMS` (never `none`, never HMAC). Either way the caller is a
`Principal`: a subject (the static token's name, or the JWT's subject claim) and scopes.

Answers: no token or an unknown one, 401 `unauthenticated`; a JWT refused, 401 with
its reason (`token_expired`, so that a client knows to refresh, `token_not_yet_valid`,
`wrong_audience`, `wrong_issuer`, `bad_signature`, `unknown_key`,
`algorithm_not_allowed`, `missing_claim`, `malformed_token`); the provider's JWKS out
of reach with no key to check the token by, 503 `idp_unavailable`; a caller without the
endpoint's scope, 403 `forbidden`.

A JWKS URL is fetched when first needed, with a time-out, and kept for
`PIPELINE_OIDC_JWKS_CACHE_S`; a key id it does not hold fetches it again, at most once
per `PIPELINE_OIDC_JWKS_MIN_REFRESH_S`, so neither a provider that does not answer nor
tokens with made-up key ids hold requests up: in between, they are refused at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from ..errors import ConfigError
from ..settings import ApiToken, Scope, Settings
from .deps import Context
from .errors import ApiError

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "OPERATE",
    "READ",
    "SAFE_METHODS",
    "Authenticator",
    "JwksSource",
    "OidcVerifier",
    "Operator",
    "Principal",
    "Scope",
    "StaticTokens",
    "needs",
]

log = logging.getLogger("pipeline.api.auth")

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="a static token, or a JWT access token of the identity provider",
    description="`PIPELINE_API_TOKENS`, or an OIDC access token (`PIPELINE_OIDC_*`)",
)

COOKIE = "__Host-pipeline-session"
"""The session cookie's name: `__Host-` makes the browser refuse it unless it is
`Secure`, has `Path=/` and no `Domain`, so a sibling host cannot set or shadow it."""
CSRF_HEADER = "X-CSRF-Token"
"""The header an unsafe request authenticated by the cookie carries its CSRF token in."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: the cookie alone authenticates them."""

session_cookie = APIKeyCookie(
    name=COOKIE,
    auto_error=False,
    scheme_name="session",
    description="the dashboard's session (`POST /v1/session`); an unsafe request also "
    f"sends `{CSRF_HEADER}` and comes from the API's own origin",
)

_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
"""The JWK key type each algorithm family verifies with (by the algorithm's prefix)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who (recorded with what they do) and what they may do."""

    subject: str
    scopes: frozenset[Scope]
    method: str
    """`token` (a static token) or `oidc` (an access token of the identity provider)."""
    expires_at: datetime | None = None
    """When the credential stops being valid (an access token's `exp`)."""

    def require(self, scope: Scope) -> None:
        """Refuse (403 `forbidden`) a caller without `scope`."""
        if scope not in self.scopes:
            raise ApiError(
                403,
                "forbidden",
                f"this token lacks the {scope!r} scope",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )


def _refused(code: str, detail: str) -> ApiError:
    """A 401 for a token that is not accepted, with its reason (RFC 6750's header too)."""
    challenge = f'Bearer error="invalid_token", error_description="{code}"'
    return ApiError(401, code, detail, {"WWW-Authenticate": challenge})


class StaticTokens:
    """The tokens of `PIPELINE_API_TOKENS`, each with its name and scopes."""

    def __init__(self, tokens: Mapping[str, tuple[Scope, ...] | ApiToken]) -> None:
        self._known: list[tuple[bytes, Principal]] = []
        for token, value in tokens.items():
            if isinstance(value, ApiToken):
                name, scopes = value.name, value.scopes
            else:
                # An unnamed token is named by a hash, never by the token itself.
                name = "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
                scopes = value
            self._known.append((token.encode(), Principal(name, frozenset(scopes), "token")))

    def entries(self) -> list[tuple[bytes, Principal]]:
        """Each token with its caller (for sessions to refer to a token by a keyed hash)."""
        return list(self._known)

    def find(self, token: str) -> Principal | None:
        """The caller holding `token`, or None if it is not one of the tokens."""
        found = None
        given = token.encode()
        for known, principal in self._known:
            # Compared in constant time, and every token is compared.
            if hmac.compare_digest(known, given):
                found = principal
        return found


@dataclass(frozen=True)
class _Key:
    jwk: jwt.PyJWK
    kty: str
    alg: str | None
    """The algorithm the JWKS binds the key to, if it names one."""


def _keys(document: Any) -> dict[str, _Key]:
    """The signing keys of a JWKS document by key id ("" for a key without one); keys
    for encryption, symmetric keys and keys PyJWT cannot read are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS: expected {"keys": [...]}')
    found: dict[str, _Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kty = entry.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            log.warning("JWKS: key %s left out: %s", entry.get("kid"), exc)
            continue
        found[str(entry.get("kid", ""))] = _Key(jwk, kty, entry.get("alg"))
    return found


class JwksSource:
    """The identity provider's signing keys, from a JWKS file (read once) or a URL
    (fetched when needed, kept, fetched again for an unknown key id, rate-limited)."""

    def __init__(
        self,
        *,
        url: str = "",
        keys: Mapping[str, _Key] | None = None,
        timeout_s: float = 3.0,
        cache_s: float = 300.0,
        min_refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s) if url else None
        self._url = url
        self._keys: dict[str, _Key] = dict(keys or {})
        self._fetched_at: float | None = None
        self._tried_at: float | None = None
        self._cache_s, self._min_refresh_s = cache_s, min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str) -> JwksSource:
        """The keys of a JWKS file; `ConfigError` naming the setting if it cannot be read."""
        try:
            keys = _keys(json.loads(Path(path).read_text()))
        except OSError as exc:
            problem = f"cannot read {path}: {exc.strerror}"
            raise ConfigError("PIPELINE_OIDC_JWKS_FILE", problem) from None
        except ValueError as exc:
            raise ConfigError("PIPELINE_OIDC_JWKS_FILE", f"{path}: {exc}") from None
        if not keys:
            raise ConfigError("PIPELINE_OIDC_JWKS_FILE", f"{path} holds no signing key")
        return cls(keys=keys)

    def key(self, kid: str | None) -> _Key:
        """The key `kid` names (a JWKS of one key serves a token without `kid`)."""
        with self._lock:
            if self._client is not None and self._should_fetch(kid):
                self._fetch()
            found = self._find(kid)
        if found is None:
            if self._client is not None and not self._keys:
                raise ApiError(
                    503,
                    "idp_unavailable",
                    "the identity provider's keys cannot be fetched: try again shortly",
                    {"Retry-After": str(max(1, round(self._min_refresh_s)))},
                )
            raise _refused("unknown_key", f"no key {kid!r} in the identity provider's JWKS")
        return found

    def _find(self, kid: str | None) -> _Key | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _should_fetch(self, kid: str | None) -> bool:
        now = self._clock()
        if self._tried_at is not None and now - self._tried_at < self._min_refresh_s:
            return False
        stale = self._fetched_at is None or now - self._fetched_at >= self._cache_s
        return stale or self._find(kid) is None

    def _fetch(self) -> None:
        assert self._client is not None
        self._tried_at = self._clock()
        try:
            keys = _keys(self._client.fetch_data())
        except (jwt.PyJWKClientError, OSError, ValueError) as exc:
            # Keys fetched before are kept: a provider that is down does not sign anyone out.
            log.warning("JWKS %s: %s (%d keys kept)", self._url, exc, len(self._keys))
            return
        self._keys, self._fetched_at = keys, self._tried_at


class OidcVerifier:
    """Checks access tokens of one identity provider and names their caller."""

    def __init__(self, settings: Settings, keys: JwksSource) -> None:
        self.issuer, self.audience = settings.oidc_issuer, settings.oidc_audience
        self.algorithms = frozenset(settings.oidc_algorithms)
        self.scopes_claim = settings.oidc_scopes_claim.split(".")
        self.scope_map = settings.oidc_scope_map
        self.subject_claim = settings.oidc_subject_claim
        self.leeway_s = settings.oidc_leeway_s
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcVerifier:
        """The verifier the settings describe (a JWKS file is read now)."""
        if settings.oidc_jwks_file:
            keys = JwksSource.from_file(settings.oidc_jwks_file)
        else:
            keys = JwksSource(
                url=settings.oidc_jwks_url,
                timeout_s=settings.oidc_jwks_timeout_s,
                cache_s=settings.oidc_jwks_cache_s,
                min_refresh_s=settings.oidc_jwks_min_refresh_s,
            )
        return cls(settings, keys)

    def verify(self, token: str) -> Principal:
        """The caller of a valid access token; else `ApiError` with the reason."""
        try:
            header = jwt.get_unverified_header(token)
            jwt.decode(token, options={"verify_signature": False})  # its claims can be read
        except jwt.PyJWTError as exc:
            raise _refused("malformed_token", f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            allowed = ", ".join(sorted(self.algorithms))
            raise _refused("algorithm_not_allowed", f"alg {alg!r} is not allowed ({allowed})")
        kid = header.get("kid")
        key = self.keys.key(kid if isinstance(kid, str) else None)
        if key.kty != _KEY_TYPES[str(alg)[:2]] or key.alg not in (None, alg):
            raise _refused("algorithm_not_allowed", f"key {kid!r} does not sign with {alg}")
        try:
            claims = jwt.decode(
                token,
                key.jwk.key,
                algorithms=[str(alg)],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise _reason(exc) from None
        return Principal(
            self._subject(claims),
            frozenset(self._scopes(claims)),
            "oidc",
            datetime.fromtimestamp(claims["exp"], UTC),
        )

    def _subject(self, claims: Mapping[str, Any]) -> str:
        subject = claims.get(self.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _refused("missing_claim", f"the token has no {self.subject_claim!r} claim")
        return subject

    def _scopes(self, claims: Mapping[str, Any]) -> Iterable[Scope]:
        value: Any = claims
        for part in self.scopes_claim:
            value = value.get(part) if isinstance(value, dict) else None
        values = value.split() if isinstance(value, str) else value
        if not isinstance(values, list):
            return ()
        return (s for v in values if isinstance(v, str) for s in self.scope_map.get(v, ()))


def _reason(exc: jwt.PyJWTError) -> ApiError:
    """The answer to a token PyJWT refuses: its reason as the error code."""
    reasons: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
        (jwt.ExpiredSignatureError, "token_expired", "the token has expired: refresh it"),
        (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
        (jwt.InvalidAudienceError, "wrong_audience", "the token is not meant for this API"),
        (jwt.InvalidIssuerError, "wrong_issuer", "the token is not from the trusted issuer"),
        (jwt.InvalidSignatureError, "bad_signature", "the token's signature does not verify"),
        (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a claim"),
        (jwt.InvalidAlgorithmError, "algorithm_not_allowed", "the token's alg is refused"),
        (jwt.DecodeError, "malformed_token", "the token cannot be read"),
    )
    for kind, code, detail in reasons:
        if isinstance(exc, kind):
            return _refused(code, f"{detail} ({exc})")
    return _refused("invalid_token", f"the token is refused: {exc}")


class Authenticator:
    """Names the caller of a bearer token: a static token, else an OIDC access token."""

    def __init__(self, tokens: StaticTokens, oidc: OidcVerifier | None = None) -> None:
        self.tokens, self.oidc = tokens, oidc

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        """The authenticator of `PIPELINE_API_TOKENS` and the `PIPELINE_OIDC_*` settings."""
        oidc = OidcVerifier.from_settings(settings) if settings.oidc_issuer else None
        return cls(StaticTokens(settings.api_tokens), oidc)

    def authenticate(self, token: str) -> Principal:
        """The caller holding `token`; else `ApiError` (401, or 503 for the provider)."""
        found = self.tokens.find(token)
        if found is not None:
            return found
        if self.oidc is not None and token.count(".") == 2:
            return self.oidc.verify(token)
        raise ApiError(401, "unauthenticated", "unknown token")


def needs(scope: Scope) -> Callable[..., Principal]:
    """A dependency that answers the caller, refusing one without `scope`."""

    def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        cookie: Annotated[str | None, Depends(session_cookie)],
        api: Context,
    ) -> Principal:
        if credentials is not None:
            principal = api.auth.authenticate(credentials.credentials)
        elif cookie:
            session = api.sessions.read(cookie)
            if request.method not in SAFE_METHODS:
                api.sessions.check_request(request, session)
            principal = session.principal
        else:
            raise ApiError(
                401,
                "unauthenticated",
                "send Authorization: Bearer <token>, or sign in (POST /v1/session)",
            )
        principal.require(scope)
        return principal

    return check


_read, _operate = needs("read"), needs("operate")

READ: list[DependsParam] = [Depends(_read)]
"""The dependencies of an endpoint that queries."""
OPERATE: list[DependsParam] = [Depends(_operate)]
"""The dependencies of an endpoint that changes what the pipeline does."""
Operator = Annotated[Principal, Depends(_operate)]
"""The caller of an endpoint that changes what the pipeline does (who is recorded)."""
