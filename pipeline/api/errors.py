"""Error answers of the query API: one JSON shape for every 4xx and 5xx.

`{"error": code, "detail": message}`. A request whose parameters do not validate adds
`problems` (one per parameter). A 5xx adds `request_id` and never says more than its
code: the cause (a psycopg error names the host, the user, the SQL) goes to the log
line that carries the same id. Every answer carries its id in the `X-Request-ID` header.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from projections.queries import BadCursor

__all__ = [
    "ERROR_RESPONSES",
    "REQUEST_ID",
    "ApiError",
    "ErrorBody",
    "install_error_handlers",
    "request_id",
    "server_error",
]

REQUEST_ID = "X-Request-ID"
"""The response header that names the request (and its log lines)."""

log = logging.getLogger("pipeline.api")


class ApiError(Exception):
    """An error answered as JSON: `{"error": code, "detail": message}`, with `headers`
    (a 401 without any says `WWW-Authenticate: Bearer`)."""

    def __init__(
        self, status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = dict(headers or {})


class Problem(BaseModel):
    """One parameter that does not validate: where it is, what is wrong, the error type."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: str
    detail: str
    problems: list[Problem] | None = None
    request_id: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "The request cannot be answered as it is"},
    "5XX": {"model": ErrorBody, "description": "The API or its database failed; see the log"},
}
"""Documents the error shape on every endpoint (in place of FastAPI's 422 schema)."""


def request_id(request: Request) -> str:
    """The id of this request, made on first use; the same for its log lines and answer."""
    state = request.state
    if not hasattr(state, "request_id"):
        state.request_id = secrets.token_hex(8)
    return str(state.request_id)


def _answer(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


def server_error(
    request: Request, status: int, code: str, detail: str, exc: BaseException, **extra: Any
) -> JSONResponse:
    """A 5xx that tells its code and request id; the cause goes to the log, not the answer."""
    rid = request_id(request)
    log.log(
        logging.ERROR if status == 500 else logging.WARNING,
        "%s %s answered %d %s: %s",
        request.method,
        request.url.path,
        status,
        code,
        exc,
        exc_info=exc if status == 500 else None,
        extra={"request_id": rid},
    )
    detail = f"{detail} (request id {rid}: the API's log holds the cause)"
    response = _answer(status, code, detail, request_id=rid, **extra)
    response.headers[REQUEST_ID] = rid
    return response


def _where(loc: tuple[Any, ...]) -> str:
    """`since` for `("query", "since")`: the parameter's name as the client wrote it."""
    return ".".join(str(part) for part in loc[1:]) or str(loc[0])


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the endpoints raise in the one shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = _answer(exc.status, exc.code, exc.detail)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(BadCursor)
    async def bad_cursor(request: Request, exc: BadCursor) -> JSONResponse:
        return _answer(400, "bad_cursor", f"{exc}: pass a page's next_cursor as it came")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
        ]
        detail = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors())
        return _answer(400, "invalid_request", detail, problems=problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        code = status.phrase.lower().replace(" ", "_").replace("-", "_")
        if status is HTTPStatus.NOT_FOUND:
            detail = f"no endpoint {request.url.path}: /docs lists them"
        elif status is HTTPStatus.METHOD_NOT_ALLOWED:
            detail = f"{request.method} is not allowed on {request.url.path}"
        else:
            detail = str(exc.detail)
        response = _answer(exc.status_code, code, detail)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(psycopg.errors.UndefinedTable)
    async def no_view(request: Request, exc: psycopg.Error) -> JSONResponse:
        detail = (
            "the view does not exist yet: start `pipeline run projections` "
            "(incidents: `pipeline run incidents`)"
        )
        return server_error(request, 503, "view_not_ready", detail, exc)

    @app.exception_handler(psycopg.OperationalError)
    async def unavailable(request: Request, exc: psycopg.Error) -> JSONResponse:
        detail = "the database does not answer: try again later"
        return server_error(request, 503, "database_unavailable", detail, exc)

    @app.exception_handler(psycopg.Error)
    async def database_error(request: Request, exc: psycopg.Error) -> JSONResponse:
        return server_error(request, 500, "database_error", "the database refused the query", exc)
