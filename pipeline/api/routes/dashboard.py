"""`/`: the live dashboard, a static page fed by `GET /v1/stream` (`routes.stream`).

Plain HTML, CSS and JavaScript from `pipeline/api/static/dashboard/` (no build step,
nothing from another host), under a Content-Security-Policy of this host only, with no
inline script or style.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from . import stream
from .docs import STATIC

__all__ = ["CSP", "router"]

PAGE = STATIC / "dashboard" / "index.html"

CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data:",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'self'",
    )
)
"""The page's Content-Security-Policy: its scripts, styles and requests from the API only."""

router = APIRouter()
router.include_router(stream.router)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The live dashboard (it asks for a token with the `read` scope)."""
    return HTMLResponse(
        PAGE.read_text(),
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
