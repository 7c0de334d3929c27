"""The FastAPI app factory. Settings are passed in (built by the CLI or tests), never read at import."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from . import __version__
from .api import docs, errors
from .api.convert import STATS_HEADERS
from .api.middleware import RequestMiddleware
from .api.routes import protected, public
from .keys import REDIS_CLIENT_OPTIONS, Keys
from .metrics import ApiMetrics
from .queue import ApiLease, JobQueue, LocalResults, Notifier, ensure_group
from .settings import ServiceSettings

log = logging.getLogger(__name__)

DESCRIPTION = """Text-to-image generation with Infinity and LD-Pruning.

Synchronous by default; send `Prefer: respond-async` for a 202 job. Errors use the OpenAI
envelope `{"error": {"message", "type", "param", "code"}}`; every response has `x-request-id`.
"""


def _limits_in_schema(app: FastAPI, settings: ServiceSettings) -> None:
    """The OpenAPI schema states this server's limits: ``n`` up to ``max_n`` (the models allow 16, the
    most ``max_n`` may be set to; a client generated from the schema accepted n=5-16 that a
    server at the default 4 then refused), the prompts up to ``max_prompt_chars``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for name in ("GenerateRequest", "OpenAIImageRequest"):
                props = schemas[name]["properties"]
                props["n"]["maximum"] = settings.max_n
                props["prompt"]["maxLength"] = settings.max_prompt_chars
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServiceSettings, *, metrics: ApiMetrics | None = None,
               local_results: LocalResults | None = None) -> FastAPI:
    """Build the API. ``metrics`` and ``local_results`` let ``ldserve serve`` share one registry with
    the in-process worker and take its results without a Redis read."""
    if settings.redis_url is None:
        raise ValueError("redis_url: the API needs a Redis URL (ldserve serve starts an embedded one)")
    api_metrics = metrics or ApiMetrics(CollectorRegistry())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aredis.Redis.from_url(settings.redis_url, **REDIS_CLIENT_OPTIONS)
        keys = Keys(settings.key_prefix)
        lease = ApiLease(client, keys, settings.api_lease_s)
        if local_results is not None:  # ldserve serve: its worker does not judge its own process's jobs
            local_results.owner = lease.instance
        app.state.queue = JobQueue(client, keys, max_len=settings.max_queue_len, job_ttl_s=settings.job_ttl_s,
                                   worker_stale_s=settings.heartbeat_stale_s, lease=lease)
        app.state.notifier = Notifier(client, app.state.queue, local_results,
                                      on_local_read=api_metrics.results_in_process.inc)
        try:
            await ensure_group(client, keys)
        except Exception as e:  # noqa: BLE001 - start anyway; readiness reports Redis down
            log.warning("could not create the consumer group yet: %s", e)
        await lease.start()
        app.state.notifier.start()
        try:
            yield
        finally:
            app.state.draining = True
            await app.state.notifier.stop()
            await lease.stop()
            await client.aclose()

    app = FastAPI(title="ldserve", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = api_metrics
    app.state.draining = False
    app.state.started_at = time.time()
    _limits_in_schema(app, settings)
    errors.install(app)
    app.include_router(public)
    app.include_router(protected)
    docs.install(app, protect=bool(settings.api_key_hashes) and not settings.public_docs)
    if settings.cors_origins:
        app.add_middleware(errors.Cors, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer",
                                          "Cancel-After", "x-request-id"],
                           expose_headers=["x-request-id", "x-job-id", "Retry-After", "Location", "Server-Timing",
                                           *STATS_HEADERS])
    app.add_middleware(RequestMiddleware, metrics=api_metrics, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)
    return app
