"""`/v1/session`: a browser signs in with a bearer token once and is then known by a
signed session cookie (`pipeline.api.sessions`); it reads its session (and the CSRF token
its unsafe requests send) and signs out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field

from ..auth import CSRF_HEADER, Scope, bearer, session_cookie
from ..deps import Context
from ..errors import ApiError
from ..sessions import Session

__all__ = ["router"]

router = APIRouter(prefix="/v1/session", tags=["session"])

Cookie = Annotated[str | None, Depends(session_cookie)]


class SessionInfo(BaseModel):
    """A browser's session: who, what they may do, until when, and its CSRF token."""

    subject: str = Field(description="the static token's name, or the access token's subject")
    scopes: list[Scope]
    method: Literal["token", "oidc"] = Field(
        description="signed in with a static or an access token"
    )
    expires_at: datetime
    csrf_token: str = Field(description=f"send it as {CSRF_HEADER} with every unsafe request")


def _info(session: Session) -> SessionInfo:
    who = session.principal
    return SessionInfo(
        subject=who.subject,
        scopes=sorted(who.scopes),
        method="oidc" if who.method == "oidc" else "token",
        expires_at=session.expires_at,
        csrf_token=session.csrf_token,
    )


@router.post("", response_model=SessionInfo)
def sign_in(
    request: Request,
    response: Response,
    api: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> SessionInfo:
    """Sign in: the bearer token (with the `read` scope) is checked as on any request, and
    the answer sets the session cookie (the token itself is not kept)."""
    api.sessions.check_origin(request)
    if credentials is None:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token> to sign in")
    principal = api.auth.authenticate(credentials.credentials)
    principal.require("read")
    session, value = api.sessions.open(principal, credentials.credentials)
    response.headers["Set-Cookie"] = api.sessions.cookie(session, value)
    response.headers["Cache-Control"] = "no-store"
    return _info(session)


@router.get("", response_model=SessionInfo)
def current(response: Response, api: Context, cookie: Cookie) -> SessionInfo:
    """This browser's session (the page asks when it loads); 401 when it has none."""
    if not cookie:
        raise ApiError(401, "unauthenticated", "no session: sign in (POST /v1/session)")
    response.headers["Cache-Control"] = "no-store"
    return _info(api.sessions.read(cookie))


@router.delete("", status_code=204, response_class=Response)
def sign_out(request: Request, api: Context, cookie: Cookie) -> Response:
    """Sign out: the cookie is cleared (a valid session's request needs its CSRF token)."""
    if cookie:
        try:
            session = api.sessions.read(cookie)
        except ApiError:
            session = None  # expired or not ours: cleared all the same
        if session is not None:
            api.sessions.check_request(request, session)
    return Response(status_code=204, headers={"Set-Cookie": api.sessions.clearing()})
