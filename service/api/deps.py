"""Dependencies: settings, queue, notifier, metrics from app.state; bearer API-key check.

All ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, and five thread
handoffs per request cost more than the work (they do no blocking I/O).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..metrics import ApiMetrics
from ..queue import JobQueue, Notifier
from ..settings import ServiceSettings
from .errors import ApiError


async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_notifier(request: Request) -> Notifier:
    return request.app.state.notifier


async def get_metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
NotifierDep = Annotated[Notifier, Depends(get_notifier)]
MetricsDep = Annotated[ApiMetrics, Depends(get_metrics)]


def key_allowed(token: str, hashes: list[str]) -> bool:
    digest = hashlib.sha256(token.encode()).hexdigest()
    ok = False
    for h in hashes:  # no early exit: constant time over the key list
        ok |= hmac.compare_digest(digest, h)
    return ok


def check_bearer(request: Request, hashes: list[str]) -> None:
    if not hashes:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token or not key_allowed(token.strip(), hashes):
        raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    check_bearer(request, settings.api_key_hashes)
