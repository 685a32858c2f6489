"""A test identity provider: signing keys the tests make, their JWKS (as a file or served
over HTTP on 127.0.0.1), and access tokens signed with them."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://idp.example.test/realms/ops"
AUDIENCE = "event-pipeline"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass
class SigningKey:
    """A private key, its key id and algorithm; `jwk` is its public half as a JWK."""

    kid: str
    alg: str
    private: PrivateKey
    name_alg: bool = True
    """Whether the JWK names its algorithm (`alg`)."""

    @classmethod
    def rsa(cls, kid: str, alg: str = "RS256") -> SigningKey:
        return cls(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed25519(cls, kid: str) -> SigningKey:
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            found = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            found = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            found = OKPAlgorithm.to_jwk(public, as_dict=True)
        found.update({"kid": self.kid, "use": "sig"})
        if self.name_alg:
            found["alg"] = self.alg
        return found

    def token(self, claims: dict[str, Any] | None = None, **header: Any) -> str:
        """An access token signed by this key: `access_claims()` changed by `claims` (a claim
        set to None is left out)."""
        merged = {**access_claims(), **(claims or {})}
        return jwt.encode(
            {k: v for k, v in merged.items() if v is not None},  # None: left out
            self.private,
            algorithm=header.pop("alg", self.alg),
            headers={k: v for k, v in {"kid": self.kid, **header}.items() if v is not None},
        )


def access_claims(scope: str = "pipeline:read", subject: str = "carol") -> dict[str, Any]:
    """The claims of a valid access token, valid for five minutes."""
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject,
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": scope,
    }


def unsigned(claims: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with this header and an empty signature (`alg: none`)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part(header)}.{part(claims)}."


def jwks(*keys: SigningKey) -> dict[str, Any]:
    """The JWKS document of these keys' public halves."""
    return {"keys": [k.jwk() for k in keys]}


def jwks_file(folder: Path, *keys: SigningKey) -> Path:
    """The JWKS of `keys`, written to a file in `folder`."""
    path = folder / "jwks.json"
    path.write_text(json.dumps(jwks(*keys)))
    return path


@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1: serves `keys`, counts the fetches."""

    keys: list[SigningKey]
    fetches: int = 0
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def serving(*keys: SigningKey) -> Iterator[JwksServer]:
    """A JWKS endpoint serving `keys` (change `.keys` to rotate them) while in the block."""
    state = JwksServer(list(keys))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state._lock:
                state.fetches += 1
                body = json.dumps(jwks(*state.keys)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/certs"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def silent() -> Iterator[str]:
    """The URL of an endpoint that takes connections and never answers (an IdP hung)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/certs"
    finally:
        listener.close()
