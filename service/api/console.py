"""The web console: ``GET /`` (the page) and ``/console/*`` (its scripts and styles).

The files ship inside the package (``service/console/static``), so an installed wheel or the image
serves them offline. The page only ever talks to this server, which its Content-Security-Policy
enforces: no inline script or style, no other origin, no framing.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent.parent / "console" / "static"
PAGE = "/"
ASSETS = "/console"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load (ETag/Last-Modified make that a 304), so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}


async def _page(request: web.Request) -> web.FileResponse:
    headers = {**_HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY}
    return web.FileResponse(STATIC_DIR / "index.html", headers=headers)


async def _asset_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(ASSETS + "/"):
        response.headers.update(_HEADERS)


def setup(app: web.Application) -> None:
    """Serve the console on ``app`` (the caller decides whether, from ``Settings.console``)."""
    app.router.add_get(PAGE, _page)
    # aiohttp's static route refuses paths that leave the folder (../, symlinks).
    app.router.add_static(ASSETS, STATIC_DIR)
    app.on_response_prepare.append(_asset_headers)
