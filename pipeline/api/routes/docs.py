"""`/docs` (Swagger UI) and `/redoc` (ReDoc), served with their scripts from the package.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank without the
internet. These load them from `/static/` (files vendored from npm with their licences,
and ReDoc's one image from a CDN taken out: `pipeline/api/static/README.md`), with no web
fonts and no badge from Swagger's online validator; their Content-Security-Policy lets the
browser fetch nothing from another host, should a later version of either try.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["CSP", "STATIC", "STATIC_PATH", "router", "static_files"]

STATIC = Path(__file__).parents[1] / "static"
"""The vendored files (package data)."""
STATIC_PATH = "/static"
"""Where the API serves them."""

SWAGGER_UI = {"validatorUrl": None}
"""Swagger UI's parameters beyond FastAPI's: its validator badge would ask a public server."""

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",  # the page's inline script starts Swagger UI
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "worker-src 'self' blob:",  # ReDoc searches in a worker it makes from a blob
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)
"""The pages' Content-Security-Policy: scripts, styles, images and requests from the API only."""

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The path the API is mounted at behind a proxy (`root_path`), without its last /."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.api_route("/docs", methods=["GET", "HEAD"])
async def swagger_ui_html(request: Request) -> HTMLResponse:
    """The API's OpenAPI document in Swagger UI."""
    app, root = request.app, _root(request)
    page = get_swagger_ui_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=root + app.swagger_ui_oauth2_redirect_url,
        swagger_js_url=f"{root}{STATIC_PATH}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC_PATH}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_PATH}/swagger-ui/favicon-32x32.png",
        swagger_ui_parameters=SWAGGER_UI,
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.api_route("/docs/oauth2-redirect", methods=["GET", "HEAD"])
async def swagger_ui_redirect() -> HTMLResponse:
    """Where Swagger UI's OAuth 2 sign-in comes back to."""
    return get_swagger_ui_oauth2_redirect_html()


@router.api_route("/redoc", methods=["GET", "HEAD"])
async def redoc_html(request: Request) -> HTMLResponse:
    """The API's OpenAPI document in ReDoc."""
    app, root = request.app, _root(request)
    page = get_redoc_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{STATIC_PATH}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{root}{STATIC_PATH}/swagger-ui/favicon-32x32.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


def static_files() -> StaticFiles:
    """The vendored files, to mount at `STATIC_PATH`."""
    return StaticFiles(directory=STATIC)
