"""Job routes: read, cancel and event stream of a job, and the signed image links (no API key)."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from fastapi import Query, Response
from fastapi.responses import StreamingResponse

from .. import file_urls
from ..imaging import MEDIA_TYPES
from ..spec import TERMINAL
from . import convert, jsonbody
from .deps import MetricsDep, QueueDep, SettingsDep
from .errors import ApiError
from .jobflow import job_files
from .routing import protected, public
from .schemas import ErrorResponse
from .schemas import Job as JobModel
from .streams import event_response, native_events


@public.get("/v1/images/files/{job_id}/{name}", tags=["openai"], response_class=Response,
            responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}},
                       **{c: {"model": ErrorResponse} for c in (403, 404, 422, 503)}})
async def image_file(job_id: str, name: str, queue: QueueDep,
                     expires: Annotated[int, Query(description="unix seconds, from the link")],
                     signature: Annotated[str, Query(max_length=64, description="from the link")]) -> Response:
    """A generated file behind a signed link (``response_format: "url"``); the link is the credential,
    no API key needed. 403 for an altered or expired link, 404 once the job's record is gone."""
    m = re.fullmatch(r"(\d{1,2})\.(png|jpeg|webp)", name)
    if m is None or len(job_id) > 64:
        raise ApiError(404, f"no file {name!r} for job {job_id!r}", code="file_not_found")
    now = time.time()
    problem = file_urls.check(await queue.url_signing_key(), job_id, name, expires, signature, now)
    if problem is not None:
        msg = "this link has expired" if problem == "url_expired" else "the link's signature does not match"
        raise ApiError(403, msg, param="signature" if problem == "invalid_signature" else "expires", code=problem)
    found = await queue.get_file(job_id, int(m.group(1)))
    if found is None:
        raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
    spec, data = found
    if data is None or spec.output_format != m.group(2):
        raise ApiError(404, f"no file {name!r} for job {job_id!r}", code="file_not_found")
    return Response(data, media_type=MEDIA_TYPES[spec.output_format],
                    headers={"Cache-Control": f"private, max-age={max(0, int(expires - now))}", "x-job-id": job_id})


@protected.get("/v1/jobs/{job_id}", response_model=JobModel, tags=["jobs"])
async def get_job(job_id: str, settings: SettingsDep, queue: QueueDep, metrics: MetricsDep) -> Any:
    """A job's status, and its images once it succeeded."""
    job = await queue.get(job_id) if len(job_id) <= 64 else None
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return jsonbody.response(convert.job_body(job, await job_files(job, settings.png, queue, metrics)))


@protected.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
               responses={200: {"content": {"text/event-stream": {}},
                                "description": "status, progress (per scale), partial_image (if the job asked "
                                               "for previews), then completed / failed / canceled / expired "
                                               "with the job (images included), or error"}})
async def job_events_route(job_id: str, settings: SettingsDep, queue: QueueDep, metrics: MetricsDep) -> Any:
    """A job's server-sent events: while it runs, every event from its start (a client that connects
    late or reconnects misses none); the stream ends with the job's final event."""
    job = await queue.get(job_id) if len(job_id) <= 64 else None
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")

    return event_response(native_events(job, settings, queue, metrics), job.id, metrics)


@protected.post("/v1/jobs/{job_id}/cancel", response_model=JobModel, tags=["jobs"])
async def cancel_job(job_id: str, queue: QueueDep, metrics: MetricsDep) -> Any:
    """Cancel a queued or running job (a running batch stops at its next scale when all its jobs are
    canceled; otherwise it finishes and this job's result is discarded)."""
    error = {"message": "canceled by the client", "type": "invalid_request_error", "param": None, "code": "canceled"}
    prev = await queue.terminate(job_id, "canceled", error) if len(job_id) <= 64 else None
    if prev is None:
        raise ApiError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    if prev in TERMINAL:
        raise ApiError(409, f"job {job_id} is already {prev}", param="job_id", code="job_already_terminal")
    metrics.api_jobs.labels(status="canceled").inc()
    job = await queue.get(job_id)
    assert job is not None
    return convert.job_body(job, None)
