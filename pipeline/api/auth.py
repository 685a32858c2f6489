"""Bearer tokens and their scopes: every `/v1` endpoint depends on `READ` or `OPERATE`.

A token is one of `PIPELINE_API_TOKENS` (token to scopes). No token or an unknown one is
answered 401 `unauthenticated`; a token without the endpoint's scope, 403 `forbidden`.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..settings import Settings
from .deps import Context
from .errors import ApiError

__all__ = ["OPERATE", "READ", "Scope", "needs", "scopes_of"]

Scope = Literal["read", "operate"]

bearer = HTTPBearer(auto_error=False)


def needs(scope: Scope) -> Callable[..., None]:
    """A dependency that refuses a request without a token that has `scope`."""

    def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        api: Context,
    ) -> None:
        if credentials is None:
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
        scopes = scopes_of(api.settings, credentials.credentials)
        if scopes is None:
            raise ApiError(401, "unauthenticated", "unknown token")
        if scope not in scopes:
            raise ApiError(403, "forbidden", f"this token lacks the {scope!r} scope")

    return check


READ: list[DependsParam] = [Depends(needs("read"))]
"""The dependencies of an endpoint that queries."""
OPERATE: list[DependsParam] = [Depends(needs("operate"))]
"""The dependencies of an endpoint that changes what the pipeline does."""


def scopes_of(settings: Settings, token: str) -> tuple[Scope, ...] | None:
    """The scopes of `token`, or None if it is not one of the settings' tokens."""
    found = None
    for known, scopes in settings.api_tokens.items():
        # Compared in constant time, and every token is compared.
        if hmac.compare_digest(known.encode(), token.encode()):
            found = scopes
    return found
