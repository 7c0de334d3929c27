"""Generation routes: ``POST /generate`` and the OpenAI-compatible ``POST /v1/images/generations``
(synchronous JSON or raw image, 202 jobs, event streams, signed links)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import BackgroundTasks, Request, Response

from .. import file_urls
from ..imaging import MEDIA_TYPES
from ..queue import Job, JobQueue
from . import convert, jsonbody
from .accept import EVENT_STREAM, JSON, negotiate, refuses
from .deps import MetricsDep, NotifierDep, QueueDep, SettingsDep
from .errors import ApiError
from .jobflow import (
    ResponseFiles,
    Timing,
    async_response,
    delivered,
    job_files,
    raise_for,
    submit,
    sync_files,
    sync_headers,
)
from .routing import AcceptH, CancelAfterH, IdemH, PreferH, protected
from .schemas import GenerateRequest, GenerateResponse, OpenAIImageRequest, OpenAIImagesResponse
from .schemas import Job as JobModel
from .streams import event_response, native_events, openai_stream


@protected.post("/generate", response_model=GenerateResponse, status_code=200, tags=["generate"],
                responses={202: {"model": JobModel},
                           200: {"content": {**{m: {} for m in MEDIA_TYPES.values()}, "text/event-stream": {}}}})
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep, queue: QueueDep,
                   notifier: NotifierDep, metrics: MetricsDep, background: BackgroundTasks, prefer: PreferH = None,
                   idem: IdemH = None, cancel_after: CancelAfterH = None, accept: AcceptH = None) -> Any:
    """Generate images; synchronous by default (waits up to the server deadline)."""
    timing = Timing()
    spec = convert.spec_from_generate(body, settings)
    chosen = _response_type(accept, spec.output_format, spec.n, is_async="respond-async" in (prefer or "").lower())
    if chosen == EVENT_STREAM:
        job, job_id, wait_s = await submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after,
                                            settings=settings, queue=queue, notifier=notifier, metrics=metrics,
                                            timing=timing, stream=True, drawn_seeds=body.seed is None)
        if job is None:
            raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
        return event_response(native_events(job, settings, queue, metrics, deadline=time.monotonic() + wait_s,
                                              owner=True, idem=idem), job.id, metrics)
    raw_fmt = next((f for f, m in MEDIA_TYPES.items() if m == chosen), None)
    files = ResponseFiles(spec, raw_fmt or spec.output_format, settings.png, metrics)
    job, job_id, _ = await submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after, settings=settings,
                                   queue=queue, notifier=notifier, metrics=metrics, timing=timing,
                                   receive=request.receive, files=files, drawn_seeds=body.seed is None)
    if "respond-async" in (prefer or "").lower():
        return await async_response(job, job_id, settings.png, queue, metrics)
    job = raise_for(job, job_id)
    delivered(job, idem, settings, queue, background)
    encoded = await sync_files(job, files, metrics, timing)
    headers = sync_headers(job, timing)
    if raw_fmt:  # the body is the image: its stats go in headers
        headers.update(convert.stats_headers(job))
        return Response(encoded[0], media_type=MEDIA_TYPES[raw_fmt], headers=headers)
    return jsonbody.response(convert.generate_body(job, encoded), headers=headers)


def _response_type(accept: str | None, output_format: str, n: int, *, is_async: bool) -> str:
    """What ``POST /generate`` answers, by ``Accept`` (``accept.negotiate``): JSON (the default),
    an event stream (not with ``Prefer: respond-async``), or the raw image (n=1; ``image/*`` gets
    the request's ``output_format``). An Accept that names none of them gets JSON, unless it
    refuses JSON (q=0), or asks only for an image with n > 1: 406."""
    images = [MEDIA_TYPES[output_format]] + [m for f, m in MEDIA_TYPES.items() if f != output_format]
    chosen = negotiate(accept, [JSON] + ([] if is_async else [EVENT_STREAM]) + (images if n == 1 else []))
    if chosen is not None:
        return chosen
    if n != 1 and negotiate(accept, images) is not None:
        raise ApiError(406, "a raw image response needs n=1; use Accept: application/json", param="n",
                       code="not_acceptable")
    if refuses(accept, JSON):
        raise ApiError(406, "nothing acceptable: this route answers application/json, text/event-stream or one "
                       f"image ({', '.join(MEDIA_TYPES.values())})", code="not_acceptable")
    return JSON


@protected.post("/v1/images/generations", response_model=OpenAIImagesResponse, tags=["openai"],
                responses={202: {"model": JobModel}})
async def images_generations(body: OpenAIImageRequest, request: Request, settings: SettingsDep, queue: QueueDep,
                             notifier: NotifierDep, metrics: MetricsDep, response: Response,
                             background: BackgroundTasks, prefer: PreferH = None, idem: IdemH = None,
                             cancel_after: CancelAfterH = None) -> Any:
    """OpenAI-compatible image generation (extensions: seed, negative_prompt, guidance_scale, pruning)."""
    timing = Timing()
    spec = convert.spec_from_openai(body, settings)
    stream = body.stream and "respond-async" not in (prefer or "").lower()
    files = ResponseFiles(spec, spec.output_format, settings.png, metrics)
    job, job_id, wait_s = await submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after,
                                        settings=settings, queue=queue, notifier=notifier, metrics=metrics,
                                        timing=timing, receive=request.receive, stream=stream,
                                        files=None if body.response_format == "url" else files,
                                        drawn_seeds=body.seed is None)
    if stream:
        if job is None:
            raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
        return event_response(openai_stream(job, body.quality, time.monotonic() + wait_s, idem, settings, queue,
                                              metrics), job.id, metrics)
    if "respond-async" in (prefer or "").lower():
        return await async_response(job, job_id, settings.png, queue, metrics)
    job = raise_for(job, job_id)
    if body.response_format == "url":
        return await _url_response(job, body.quality, request, settings, queue, metrics, timing, response)
    delivered(job, idem, settings, queue, background)
    encoded = await sync_files(job, files, metrics, timing)
    return jsonbody.response(convert.openai_body(job, encoded, body.quality), headers=sync_headers(job, timing))


async def _url_response(job: Job, quality: str | None, request: Request, settings: SettingsDep, queue: JobQueue,
                        metrics: MetricsDep, timing: Timing, response: Response) -> dict[str, Any]:
    """``response_format: "url"``: the files are encoded into the job's record (which keeps them,
    and its images, until its TTL) and answered as signed links to ``image_file``."""
    t = time.perf_counter()
    files = await job_files(job, settings.png, queue, metrics)
    timing.add("encode", t)
    if files is None:  # an earlier synchronous response delivered and dropped them
        raise ApiError(410, f"the images of job {job.id} were already delivered", code="output_delivered")
    response.headers["Server-Timing"] = timing.header(job)
    response.headers["x-job-id"] = job.id
    base = settings.public_base_url or str(request.base_url).rstrip("/")
    expires = (job.completed_ms or job.created_ms) // 1000 + settings.job_ttl_s
    key = await queue.url_signing_key()
    ext = job.spec.output_format
    urls = [file_urls.signed_url(base, key, job.id, i, ext, expires) for i in range(len(files))]
    return convert.openai_body(job, files, quality, urls)
