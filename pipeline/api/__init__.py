"""The HTTP API over the views (FastAPI): `create_app(settings)`, run by `pipeline run api`."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
