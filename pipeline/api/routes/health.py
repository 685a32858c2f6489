"""`/healthz`, `/readyz`, `/metrics`: probes and Prometheus metrics, with no token."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from ..deps import Context
from ..errors import server_error

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process lives."""
    return {"status": "alive"}


@router.get("/readyz")
def readyz(request: Request, api: Context) -> JSONResponse:
    """The database answers."""
    try:
        with api.pool.connection(timeout=2.0) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        detail = "the database does not answer"
        problems = [detail]
        return server_error(
            request, 503, "database_unavailable", detail, exc, ready=False, problems=problems
        )
    return JSONResponse({"ready": True, "problems": []})


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(api: Context) -> PlainTextResponse:
    """Prometheus metrics of the API."""
    return PlainTextResponse(generate_latest(api.registry), media_type="text/plain; version=0.0.4")
