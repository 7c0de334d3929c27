"""Interactive API docs served fully offline (Swagger UI assets from the swagger-ui-bundle package)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from .deps import require_api_key

ASSETS = "/docs/assets"


def _assets_dir() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


def install(app: FastAPI, *, protect: bool) -> None:
    deps = [Depends(require_api_key)] if protect else []
    router = APIRouter(dependencies=deps, include_in_schema=False)
    assets = _assets_dir()

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        if assets is None:
            return HTMLResponse('<html><body><h1>ldserve API</h1><p>Swagger UI assets are not installed '
                                '(pip install swagger-ui-bundle). The schema is at <a href="/openapi.json">'
                                '/openapi.json</a>.</p></body></html>')
        return get_swagger_ui_html(openapi_url="/openapi.json", title="ldserve API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")

    app.include_router(router)
    if assets is not None:
        app.mount(ASSETS, StaticFiles(directory=assets), name="docs-assets")
