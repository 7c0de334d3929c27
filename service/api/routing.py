"""The two routers (``protected`` needs the API key when keys are set) and the shared header types."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header

from .deps import require_api_key
from .schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 406, 409, 410, 413,
                                                                                  415, 422, 429, 499, 500, 503, 504)}
"""Every error status a protected route can answer, in the OpenAI envelope: 406 (``Accept``), 410 (images
already delivered), 415 (not JSON), 499 (the client left before its synchronous result)."""
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
public = APIRouter()

PreferH = Annotated[str | None, Header(description="'respond-async' answers 202 with a job")]
IdemH = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                     description="Retries with the same key and body return the same job "
                                                 "(a job that expired or was canceled: a new one)")]
CancelAfterH = Annotated[str | None, Header(alias="Cancel-After", max_length=16,
                                            description="Deadline: '30', '30s', '2m'; expired jobs never run")]
AcceptH = Annotated[str | None, Header(description="image/png, image/jpeg or image/webp with n=1: raw image; "
                                                   "text/event-stream: the job's events, as GET /v1/jobs/{id}/events; "
                                                   "negotiated by q-value (default application/json)")]
