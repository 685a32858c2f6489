"""Who the API lets in: static tokens, and OIDC access tokens signed by keys the test
makes, each refusal with its reason; the JWKS from a file and from an HTTP endpoint on
127.0.0.1, cached, refreshed for a new key, and an endpoint that is down or hangs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.api.auth import Authenticator, JwksSource, OidcVerifier
from pipeline.api.errors import ApiError
from pipeline.errors import ConfigError
from pipeline.settings import ApiToken, Settings

from ..idp import AUDIENCE, ISSUER, SigningKey, access_claims, jwks_file, serving, silent, unsigned

RSA = SigningKey.rsa("rsa-1")
EC = SigningKey.ec("ec-1")
ED = SigningKey.ed25519("ed-1")
OTHER = SigningKey.rsa("rsa-1")  # the same key id, another key: a forger's
TOKENS = {"s3cret": ("read",), "ops-s3cret": ApiToken(name="ops-bot", scopes=("operate",))}


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_tokens": TOKENS,
        "oidc_issuer": ISSUER,
        "oidc_audience": AUDIENCE,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture
def auth(tmp_path: Path) -> Authenticator:
    """An authenticator of the static tokens and of the IdP's JWKS file."""
    return Authenticator.from_settings(
        _settings(oidc_jwks_file=str(jwks_file(tmp_path, RSA, EC, ED)))
    )


def _refused(auth: Authenticator, token: str) -> ApiError:
    with pytest.raises(ApiError) as refused:
        auth.authenticate(token)
    return refused.value


def test_static_tokens_are_named_and_scoped(auth: Authenticator) -> None:
    plain = auth.authenticate("s3cret")
    assert plain.scopes == {"read"} and plain.method == "token"
    assert plain.subject.startswith("token-") and "s3cret" not in plain.subject
    assert auth.authenticate("ops-s3cret").subject == "ops-bot"
    unknown = _refused(auth, "nope")
    assert (unknown.status, unknown.code) == (401, "unauthenticated")


@pytest.mark.parametrize("key", [RSA, EC, ED], ids=["RS256", "ES256", "EdDSA"])
def test_a_valid_access_token_names_its_subject_and_scopes(
    auth: Authenticator, key: SigningKey
) -> None:
    reader = auth.authenticate(key.token())
    assert (reader.subject, reader.scopes, reader.method) == ("carol", {"read"}, "oidc")
    assert reader.expires_at is not None
    reader.require("read")
    with pytest.raises(ApiError) as lacking:
        reader.require("operate")
    assert (lacking.value.status, lacking.value.code) == (403, "forbidden")
    assert "operate" in lacking.value.detail
    assert 'error="insufficient_scope"' in lacking.value.headers["WWW-Authenticate"]
    operator = auth.authenticate(key.token(access_claims("openid pipeline:operate", "dave")))
    assert (operator.subject, operator.scopes) == ("dave", {"read", "operate"})


def _now() -> int:
    return int(time.time())


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (lambda: RSA.token({"exp": _now() - 3600}), "token_expired"),
        (lambda: RSA.token({"nbf": _now() + 3600}), "token_not_yet_valid"),
        (lambda: RSA.token({"aud": "another-api"}), "wrong_audience"),
        (lambda: RSA.token({"iss": "https://evil.example.test"}), "wrong_issuer"),
        (lambda: OTHER.token(), "bad_signature"),
        (lambda: SigningKey.rsa("rsa-9").token(), "unknown_key"),
        (
            lambda: unsigned(access_claims(), {"alg": "none", "kid": "rsa-1"}),
            "algorithm_not_allowed",
        ),
        (lambda: unsigned(access_claims(), {"alg": "None", "typ": "JWT"}), "algorithm_not_allowed"),
        (lambda: RSA.token(alg="RS512"), "algorithm_not_allowed"),  # not in the allow-list
        (lambda: RSA.token(alg="PS256"), "algorithm_not_allowed"),  # the JWK says RS256
        (lambda: EC.token(kid="rsa-1"), "algorithm_not_allowed"),  # ES256 with an RSA key
        (lambda: _hmac_with_the_public_key(), "algorithm_not_allowed"),
        (lambda: RSA.token({"sub": None}), "missing_claim"),
        (lambda: RSA.token({"exp": None}), "missing_claim"),
        (lambda: RSA.token({"aud": None}), "missing_claim"),
        (lambda: "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "malformed_token"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_token_not_accepted_is_refused_with_its_reason(
    auth: Authenticator, token: Any, code: str
) -> None:
    refused = _refused(auth, token())
    assert (refused.status, refused.code) == (401, code), refused.detail
    header = refused.headers["WWW-Authenticate"]
    assert header == f'Bearer error="invalid_token", error_description="{code}"'


def _hmac_with_the_public_key() -> str:
    """HS256 keyed with the RSA key's public JWK: the classic algorithm confusion."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    signing_input = f"{part({'alg': 'HS256', 'kid': 'rsa-1'})}.{part(access_claims())}"
    secret = json.dumps(RSA.jwk()).encode()
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def test_scopes_come_from_the_configured_claim_through_the_map(tmp_path: Path) -> None:
    auth = Authenticator.from_settings(
        _settings(
            oidc_jwks_file=str(jwks_file(tmp_path, RSA)),
            oidc_scopes_claim="realm_access.roles",
            oidc_scope_map={"pipeline-operator": ("read", "operate"), "viewer": ("read",)},
            oidc_subject_claim="preferred_username",
        )
    )
    roles = {"realm_access": {"roles": ["offline_access", "pipeline-operator"]}}
    who = auth.authenticate(RSA.token({**roles, "preferred_username": "erin", "scope": None}))
    assert (who.subject, who.scopes) == ("erin", {"read", "operate"})
    nothing = auth.authenticate(RSA.token({"preferred_username": "frank"}))
    assert nothing.scopes == set()  # no roles claim: signed in, allowed nothing (403)
    nameless = _refused(auth, RSA.token(roles))
    assert nameless.code == "missing_claim" and "preferred_username" in nameless.detail


def test_a_jwks_of_one_key_serves_a_token_without_a_key_id(tmp_path: Path) -> None:
    auth = Authenticator.from_settings(_settings(oidc_jwks_file=str(jwks_file(tmp_path, ED))))
    assert auth.authenticate(ED.token(kid=None)).subject == "carol"


def test_without_oidc_a_jwt_is_an_unknown_token() -> None:
    auth = Authenticator.from_settings(Settings(_env_file=None, api_tokens=TOKENS))
    assert _refused(auth, RSA.token()).code == "unauthenticated"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"oidc_audience": ""}, "PIPELINE_OIDC_AUDIENCE"),
        ({}, "PIPELINE_OIDC_JWKS_URL or PIPELINE_OIDC_JWKS_FILE"),
        ({"oidc_jwks_url": "http://a", "oidc_jwks_file": "b"}, "PIPELINE_OIDC_JWKS_URL or"),
        ({"oidc_jwks_file": "b", "oidc_algorithms": ["RS256", "HS256"]}, "HS256 not allowed"),
        ({"oidc_jwks_file": "b", "oidc_algorithms": ["none"]}, "none not allowed"),
        ({"oidc_jwks_file": "b", "oidc_algorithms": []}, "PIPELINE_OIDC_ALGORITHMS: empty"),
    ],
)
def test_oidc_settings_are_checked_at_start(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        _settings(**overrides)


def test_a_jwks_file_that_cannot_be_used_names_the_setting(tmp_path: Path) -> None:
    missing = _settings(oidc_jwks_file=str(tmp_path / "none.json"))
    with pytest.raises(ConfigError, match="PIPELINE_OIDC_JWKS_FILE: cannot read"):
        Authenticator.from_settings(missing)
    symmetric = tmp_path / "oct.json"
    symmetric.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}))
    with pytest.raises(ConfigError, match="holds no signing key"):
        Authenticator.from_settings(_settings(oidc_jwks_file=str(symmetric)))


# -- the JWKS from a URL ---------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _from_url(url: str, clock: Clock, **options: float) -> Authenticator:
    settings = _settings(oidc_jwks_url=url)
    source = JwksSource(url=url, clock=clock, **{"timeout_s": 2.0, **options})
    return Authenticator(
        Authenticator.from_settings(settings).tokens, OidcVerifier(settings, source)
    )


def test_a_jwks_url_is_fetched_once_kept_and_fetched_again_for_a_new_key() -> None:
    clock = Clock()
    with serving(RSA) as idp:
        auth = _from_url(idp.url, clock, cache_s=300, min_refresh_s=10)
        for _ in range(3):
            assert auth.authenticate(RSA.token()).subject == "carol"
        assert idp.fetches == 1
        # The provider rotates: a token signed by its new key fetches the JWKS again...
        idp.keys = [RSA, EC]
        clock.now += 11
        assert auth.authenticate(EC.token()).method == "oidc"
        assert idp.fetches == 2
        # ... but made-up key ids do not make it fetch on every request.
        for n in range(5):
            assert _refused(auth, SigningKey.ec(f"made-up-{n}").token()).code == "unknown_key"
        assert idp.fetches == 2
        clock.now += 301  # kept for PIPELINE_OIDC_JWKS_CACHE_S
        auth.authenticate(RSA.token())
        assert idp.fetches == 3


def test_keys_fetched_before_are_kept_while_the_provider_is_down() -> None:
    clock = Clock()
    with serving(RSA) as idp:
        auth = _from_url(idp.url, clock, cache_s=60, min_refresh_s=10)
        auth.authenticate(RSA.token())
    clock.now += 61  # stale, and the endpoint is gone
    assert auth.authenticate(RSA.token()).subject == "carol"
    assert _refused(auth, EC.token()).code == "unknown_key"


def test_a_provider_that_hangs_is_answered_503_within_the_timeout_then_at_once() -> None:
    clock = Clock()
    with silent() as url:
        auth = _from_url(url, clock, timeout_s=0.5, min_refresh_s=10)
        started = time.monotonic()
        first = _refused(auth, RSA.token())
        waited = time.monotonic() - started
        assert (first.status, first.code) == (503, "idp_unavailable")
        assert first.headers["Retry-After"] == "10"
        assert waited < 2.0
        # Until PIPELINE_OIDC_JWKS_MIN_REFRESH_S has passed, refused without waiting.
        started = time.monotonic()
        assert _refused(auth, RSA.token()).code == "idp_unavailable"
        assert time.monotonic() - started < 0.2
        # Static tokens are never held up by the provider.
        assert auth.authenticate("s3cret").method == "token"


def test_a_provider_that_refuses_connections_is_answered_503_at_once() -> None:
    with serving(RSA) as idp:
        url = idp.url
    auth = _from_url(url, Clock())
    started = time.monotonic()
    assert _refused(auth, RSA.token()).status == 503
    assert time.monotonic() - started < 1.0


def test_concurrent_requests_during_an_outage_wait_for_one_fetch_at_most() -> None:
    clock = Clock()
    with silent() as url:
        auth = _from_url(url, clock, timeout_s=0.5, min_refresh_s=10)
        answers: list[str] = []

        def call() -> None:
            answers.append(_refused(auth, RSA.token()).code)

        threads = [threading.Thread(target=call) for _ in range(8)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=5)
        assert time.monotonic() - started < 2.0
    assert answers == ["idp_unavailable"] * 8
