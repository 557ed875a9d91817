"""/docs and /redoc served with no outside host: the assets come from the fastapi-offline package.

fastapi-offline ships Swagger UI 5 and ReDoc 2 builds as package data; we serve its `static`
folder and build the two pages ourselves, so the favicon, the ReDoc fonts and Swagger UI's
validator badge, which FastAPI's defaults fetch from the internet, stay off. ReDoc's bundle
also loads its own logo from a CDN, whatever its options say; we serve the bundle with that one
address replaced by an inline image. A Content-Security-Policy on both pages makes the browser
itself refuse anything else from another origin.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
STATIC = files("fastapi_offline") / "static"
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
BLANK_IMAGE = b"data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEAAAAALAAAAAABAAEAAAIBAAA="
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",  # the pages start their UI from an inline script
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",  # ReDoc searches in a web worker
        "connect-src 'self'",
    ]
)


@cache
def redoc_bundle() -> bytes:
    """ReDoc's bundle, read once, with its CDN logo replaced by an inline blank image."""
    return (STATIC / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, BLANK_IMAGE)


def add_docs(app: FastAPI) -> None:
    """Mount the assets and add /openapi.json and the /docs and /redoc pages that show it."""
    title = app.title

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        """The app's spec; behind a path prefix (root path), with that prefix as its server, so
        that "Try it out" goes through the proxy. Served here rather than by FastAPI, whose
        handling of the root path has changed from version to version."""
        document = app.openapi()
        root = request.scope.get("root_path", "").rstrip("/")
        return JSONResponse({**document, "servers": [{"url": root}]} if root else document)

    @app.get(f"{ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_js() -> Response:
        headers = {"Cache-Control": "public, max-age=86400"}
        return Response(redoc_bundle(), media_type="text/javascript", headers=headers)

    app.mount(ASSETS, StaticFiles(directory=str(STATIC)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title}: Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False, "displayRequestDuration": True},
        )
        page.headers["Content-Security-Policy"] = CSP
        return page

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title}: ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CSP
        return page
