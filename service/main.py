"""The FastAPI app factory. Settings are passed in (built by the CLI or tests), never read at import."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from . import __version__
from .api import docs, errors
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
    errors.install(app)
    app.include_router(public)
    app.include_router(protected)
    docs.install(app, protect=bool(settings.api_key_hashes) and not settings.public_docs)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer",
                                          "Cancel-After", "x-request-id"],
                           expose_headers=["x-request-id", "x-job-id", "Retry-After", "Location"])
    app.add_middleware(RequestMiddleware, metrics=api_metrics, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)
    return app
