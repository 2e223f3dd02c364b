"""The playground: a chat page at ``/`` over the server's own API (issue 19).

Four files ship in the package (``vlmlab/server/playground/``): one HTML page, two plain ES
modules (the app, and the Markdown renderer that never lets model text become markup), one
stylesheet. There is no build step and nothing comes from a CDN, so the page works offline.
The page and its assets are answered with a strict Content-Security-Policy: scripts and styles
only from this server, no inline script or style, images only from here, ``data:`` or ``blob:``,
fetches only to this server. The page is open (no API key); it asks for the key when the API
answers 401.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from vlmlab.protocol.errors import NotFoundError

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# The only files served: name -> content type. Anything else under /playground/ is a 404.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a server upgrade must not keep an old app.js
}


def asset_bytes(name: str) -> bytes:
    """The bytes of one shipped playground file.

    Raises:
        NotFoundError: ``name`` is not one of :data:`ASSETS`.
    """
    if name not in ASSETS:
        raise NotFoundError(f"no playground file {name!r}; there are {', '.join(sorted(ASSETS))}")
    return resources.files("vlmlab.server").joinpath("playground", name).read_bytes()


def asset_response(name: str) -> Response:
    return Response(asset_bytes(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


def add_playground(app: FastAPI) -> None:
    """Add ``GET /`` (the page) and ``GET /playground/{name}`` (its script and stylesheet)."""

    @app.get("/", include_in_schema=False)
    async def playground_page() -> Response:
        return asset_response("index.html")

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        return asset_response(name)
