"""HTTP routes. By module: ``generation`` (native + OpenAI), ``jobs`` (read, cancel, events,
signed image links), and here the model list, the playground, health probes and metrics; the
request flow they share is in ``jobflow`` and ``streams``, the routers in ``routing``."""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import generation, jobs  # noqa: F401  (their routes register on the routers)
from .deps import MetricsDep, QueueDep, SettingsDep, check_bearer
from .errors import ApiError
from .routing import protected, public
from .schemas import ModelCard, ModelList

__all__ = ["protected", "public"]
log = logging.getLogger(__name__)

def _model_cards(request: Request, settings: SettingsDep) -> list[dict[str, Any]]:
    created = int(request.app.state.started_at)
    return [{"id": name, "object": "model", "created": created, "owned_by": "ldserve"}
            for name in (settings.model_preset, *settings.model_aliases)]


@protected.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request, settings: SettingsDep) -> Any:
    """The served model and its aliases (``LDSERVE_MODEL_ALIASES``), OpenAI list shape."""
    return {"object": "list", "data": _model_cards(request, settings)}


@protected.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["models"],
               responses={404: {"description": "not a name of the served model"}})
async def retrieve_model(model_id: str, request: Request, settings: SettingsDep) -> Any:
    """One served model name (OpenAI ``models.retrieve``)."""
    for card in _model_cards(request, settings):
        if card["id"] == model_id:
            return card
    raise ApiError(404, f"model {model_id!r} is not served here", param="model", code="model_not_found")


PLAYGROUND = Path(__file__).with_name("playground.html")


@functools.cache
def _playground_html() -> str:
    return PLAYGROUND.read_text(encoding="utf-8")
# the page's own inline script and style, its images as data: URLs, its calls to this origin only
PLAYGROUND_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
                  "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


@public.get("/", include_in_schema=False)
async def playground(settings: SettingsDep) -> HTMLResponse:
    """A one-page playground (settings.playground): generate with live progress and previews."""
    if not settings.playground:
        raise ApiError(404, "the playground is turned off (LDSERVE_PLAYGROUND)", code="not_found")
    return HTMLResponse(_playground_html(),
                        headers={"Content-Security-Policy": PLAYGROUND_CSP, "Cache-Control": "no-cache"})


@public.head("/health/live", include_in_schema=False)  # HEAD out of the schema: one operation per probe
@public.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@public.head("/health/ready", include_in_schema=False)
@public.get("/health/ready", tags=["health"], responses={503: {"description": "not ready"}})
async def ready(request: Request, settings: SettingsDep, queue: QueueDep) -> JSONResponse:
    """Ready: Redis reachable, a worker warm and heartbeating, not draining."""
    checks: dict[str, Any] = {"draining": bool(request.app.state.draining)}
    try:
        await asyncio.wait_for(queue.client.ping(), timeout=2)
        workers = await queue.workers()
        checks["redis"] = "ok"
        checks["workers_ready"] = sum(1 for w in workers if w.get("ready") and w["age_s"] < settings.heartbeat_stale_s)
    except Exception as e:  # noqa: BLE001 - any Redis failure means not ready
        checks["redis"] = f"unreachable: {type(e).__name__}"
        checks["workers_ready"] = 0
    ok = checks["redis"] == "ok" and checks["workers_ready"] > 0 and not checks["draining"]
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)


@public.get("/metrics", tags=["health"], response_class=Response)
async def metrics_route(request: Request, settings: SettingsDep, queue: QueueDep, metrics: MetricsDep) -> Response:
    """Prometheus metrics (bearer-protected unless protect_metrics is off)."""
    if settings.protect_metrics:
        check_bearer(request, settings.api_key_hashes)
    try:
        waiting, pending = await queue.depth()
        metrics.set_queue_snapshot(waiting, pending, await queue.workers(), settings.heartbeat_stale_s)
    except Exception as e:  # noqa: BLE001 - a scrape still answers when Redis is down
        log.warning("metrics: queue snapshot failed: %s", e)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
