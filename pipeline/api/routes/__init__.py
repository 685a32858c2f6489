"""The API's routers, one per resource, in the order `create_app` includes them."""

from __future__ import annotations

from fastapi import APIRouter

from . import (
    audit,
    cameras,
    docs,
    events,
    health,
    incidents,
    metrics,
    projections,
    security,
    services,
    session,
)

__all__ = ["ROUTERS"]

ROUTERS: tuple[APIRouter, ...] = (
    docs.router,
    session.router,
    audit.router,  # public: see pipeline.api.routes.audit
    health.router,
    security.router,
    services.router,
    metrics.router,
    cameras.router,
    events.router,
    projections.router,
    incidents.router,
)
