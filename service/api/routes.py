"""HTTP routes: generation (native + OpenAI), jobs, models, health probes and metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive

from .. import file_urls
from ..imaging import MEDIA_TYPES, PngParams, encode, run_encode
from ..queue import IdempotencyMismatch, Job, JobQueue, QueueFull
from ..spec import TERMINAL, JobSpec
from . import convert
from .deps import MetricsDep, NotifierDep, QueueDep, SettingsDep, check_bearer, require_api_key
from .errors import ApiError
from .events import job_events, sse
from .schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelList,
    OpenAIImageRequest,
    OpenAIImagesResponse,
)
from .schemas import (
    Job as JobModel,
)

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 404, 409, 413, 422, 429,
                                                                                  500, 503, 504)}
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)
public = APIRouter()

PreferH = Annotated[str | None, Header(description="'respond-async' answers 202 with a job")]
IdemH = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                     description="Retries with the same key and body return the same job")]
CancelAfterH = Annotated[str | None, Header(alias="Cancel-After", max_length=16,
                                            description="Deadline: '30', '30s', '2m'; expired jobs never run")]
AcceptH = Annotated[str | None, Header(description="image/png, image/jpeg or image/webp with n=1: raw image; "
                                                   "text/event-stream: the job's events, as GET /v1/jobs/{id}/events")]


DISCONNECT_ERROR = {"message": "the client disconnected before the result", "type": "invalid_request_error",
                    "param": None, "code": "client_disconnected"}
DEADLINE_ERROR = {"message": "deadline passed before the job finished", "type": "timeout_error", "param": None,
                  "code": "deadline_exceeded"}


def _duration(value: str | None) -> float | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", value)
    if not m:
        raise ApiError(400, "Cancel-After must look like '30', '30s', '500ms' or '2m'", param="Cancel-After",
                       code="invalid_header")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds <= 0 or seconds > 86_400:
        raise ApiError(400, "Cancel-After must be in (0, 24h]", param="Cancel-After", code="invalid_header")
    return seconds


def _accept_image(accept: str | None) -> str | None:
    """The image format the Accept header prefers over JSON, if any."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("application/json", "*/*", "application/*"):
            return None
        for fmt, mt in MEDIA_TYPES.items():
            if media == mt:
                return fmt
    return None


class Timing:
    """Phases of one request, sent as a ``Server-Timing`` header (milliseconds): ``enqueue`` (job
    stored and queued), ``wait`` (until the result is back), ``infer`` and ``worker`` (the worker's
    own time besides inference: picking the job up, starting it, converting and storing results),
    ``encode`` (image files), ``app`` (the whole handler). Browsers show it in their dev tools."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ms: dict[str, float] = {}

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.ms[name] = (now - since) * 1e3
        return now

    def header(self, job: Job | None) -> str:
        r = (job.result or {}) if job is not None else {}
        ms = dict(self.ms)
        if r.get("inference_s") is not None:
            ms["infer"] = r["inference_s"] * 1e3
            if r.get("worker_s") is not None:
                ms["worker"] = max(0.0, r["worker_s"] - r["inference_s"]) * 1e3
        ms["app"] = (time.perf_counter() - self.t0) * 1e3
        return ", ".join(f"{k};dur={v:.2f}" for k, v in ms.items())


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body was read already: uvicorn's next message is the
    disconnect; a server that answers at once with empty body messages is polled, not spun on)."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


async def _wait_unless_gone(waiting: Awaitable[Job | None], receive: Receive | None) -> tuple[Job | None, bool]:
    """(the job as ``waiting`` left it, False), or (None, True) if the client disconnected first."""
    if receive is None:
        return await waiting, False
    wait_task, gone_task = asyncio.ensure_future(waiting), asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({wait_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        return (wait_task.result(), False) if wait_task in done else (None, True)
    finally:
        for t in (wait_task, gone_task):
            t.cancel()


async def _submit(spec: JobSpec, *, prefer: str | None, idem: str | None, cancel_after: str | None,
                  settings: SettingsDep, queue: QueueDep, notifier: NotifierDep,
                  metrics: MetricsDep, timing: Timing, receive: Receive | None = None,
                  stream: bool = False) -> tuple[Job | None, str, float]:
    """Admit the job; for a synchronous request wait for it. A synchronous client that disconnects
    first (closed tab, client timeout before an SDK retry) cancels its job, so the GPU does not run
    work nobody will read: unless it sent an Idempotency-Key, whose retry attaches to the same job.
    ``stream``: admitted with the synchronous deadline, not waited for (the caller streams it)."""
    is_async = "respond-async" in (prefer or "").lower()
    deadline = _duration(cancel_after)
    wait_s = settings.sync_timeout_s if deadline is None else min(deadline, settings.sync_timeout_s)
    timeout = deadline if is_async and not stream else wait_s
    try:
        t = time.perf_counter()
        job_id, _created = await queue.enqueue(spec, timeout_s=timeout, idempotency_key=idem)
        t = timing.add("enqueue", t)
    except QueueFull as e:
        raise ApiError(429, f"the queue is full ({e.depth} jobs); retry later", code="queue_full",
                       headers={"Retry-After": str(e.retry_after_s)}) from None
    except IdempotencyMismatch as e:
        raise ApiError(422, str(e), param="Idempotency-Key", code="idempotency_key_reused") from None
    if is_async or stream:
        return await queue.get(job_id), job_id, wait_s
    job, gone = await _wait_unless_gone(notifier.wait(job_id, wait_s), receive)
    timing.add("wait", t)
    if gone:
        if idem is None:
            prev = await queue.terminate(job_id, "canceled", DISCONNECT_ERROR)
            if prev in ("queued", "processing"):
                metrics.api_jobs.labels(status="canceled").inc()
        raise ApiError(499, "the client closed the request", code="client_disconnected")
    if job is None or job.terminal:
        return job, job_id, wait_s
    prev = await queue.terminate(job_id, "expired", DEADLINE_ERROR)
    if prev in ("queued", "processing"):
        metrics.api_jobs.labels(status="expired").inc()
    return await queue.get(job_id), job_id, wait_s


def _raise_for(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
    if job.status == "succeeded":
        return job
    err = job.error or {}
    status = {"expired": 504, "canceled": 409}.get(job.status, 500)
    raise ApiError(status, err.get("message") or f"job {job.status}", code=err.get("code") or job.status,
                   type_=err.get("type"))


async def _async_response(job: Job | None, job_id: str, png: PngParams, queue: JobQueue,
                          metrics: MetricsDep) -> JSONResponse:
    if job is None:
        raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
    files = await _job_files(job, png, queue, metrics)
    return JSONResponse(convert.job_body(job, files), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})



async def _encode_images(job: Job, png: PngParams) -> list[bytes]:
    return await run_encode(job.spec.width * job.spec.height * len(job.images), convert.encoded_images,
                             job, png)


def _count_images(metrics: MetricsDep, fmt: str, n: int) -> None:
    metrics.images_generated.labels(output_format=fmt).inc(n)


def _drops_delivered(idem: str | None, settings: SettingsDep) -> bool:
    """Whether a response that delivers a job's images (synchronous or streamed) then drops them
    from Redis (3 MB of raw RGB per 1024 px image; the record stays): unless an Idempotency-Key's
    retry may come for them, or ``keep_delivered_images``."""
    return idem is None and not settings.keep_delivered_images


def _delivered(job: Job, idem: str | None, settings: SettingsDep, queue: JobQueue,
               background: BackgroundTasks) -> None:
    """Once a synchronous response is sent, its job's images leave Redis (``_drops_delivered``)."""
    if _drops_delivered(idem, settings):
        background.add_task(queue.drop_images, job.id, len(job.images))


async def _job_files(job: Job, png: PngParams, queue: JobQueue, metrics: MetricsDep) -> list[bytes] | None:
    """A job read's files: None unless it succeeded with its images still stored; encoded by the
    first read and kept in the job hash (clients poll; a 1024 px PNG is ~85 ms of CPU), counted
    once in ``images_generated``."""
    if job.status != "succeeded" or job.images_dropped:
        return None
    if job.files:
        return job.files
    encoded = await _encode_images(job, png)
    if await queue.store_files(job.id, encoded) == 1:
        _count_images(metrics, job.spec.output_format, len(encoded))
    return encoded


async def _delivered_files(job: Job, png: PngParams, metrics: MetricsDep) -> list[bytes]:
    """Files a response hands over once (synchronous or streamed, not kept in the job): encoded, counted."""
    encoded = await _encode_images(job, png)
    _count_images(metrics, job.spec.output_format, len(encoded))
    return encoded


async def _sync_files(job: Job, png: PngParams, metrics: MetricsDep, timing: Timing, response: Response) -> list[bytes]:
    """A synchronous JSON response's files, timed into its Server-Timing header."""
    t = time.perf_counter()
    encoded = await _delivered_files(job, png, metrics)
    timing.add("encode", t)
    response.headers["Server-Timing"] = timing.header(job)
    return encoded


@protected.post("/generate", response_model=GenerateResponse, status_code=200, tags=["generate"],
                responses={202: {"model": JobModel},
                           200: {"content": {**{m: {} for m in MEDIA_TYPES.values()}, "text/event-stream": {}}}})
async def generate(body: GenerateRequest, request: Request, settings: SettingsDep, queue: QueueDep,
                   notifier: NotifierDep,
                   metrics: MetricsDep, response: Response, background: BackgroundTasks, prefer: PreferH = None,
                   idem: IdemH = None, cancel_after: CancelAfterH = None, accept: AcceptH = None) -> Any:
    """Generate images; synchronous by default (waits up to the server deadline)."""
    timing = Timing()
    spec = convert.spec_from_generate(body, settings)
    if "text/event-stream" in (accept or "").lower() and "respond-async" not in (prefer or "").lower():
        job, job_id, wait_s = await _submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after,
                                            settings=settings, queue=queue, notifier=notifier, metrics=metrics,
                                            timing=timing, stream=True)
        if job is None:
            raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
        return _event_response(_native_events(job, settings, queue, metrics, deadline=time.monotonic() + wait_s,
                                              owner=True, idem=idem), job.id, metrics)
    raw_fmt = _accept_image(accept)
    if raw_fmt and spec.n != 1:
        raise ApiError(406, "a raw image response needs n=1; use Accept: application/json", param="n",
                       code="not_acceptable")
    job, job_id, _ = await _submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after, settings=settings,
                                   queue=queue, notifier=notifier, metrics=metrics, timing=timing,
                                   receive=request.receive)
    if "respond-async" in (prefer or "").lower():
        return await _async_response(job, job_id, settings.png, queue, metrics)
    job = _raise_for(job, job_id)
    _delivered(job, idem, settings, queue, background)
    if raw_fmt:
        t = time.perf_counter()
        data = await run_encode(spec.width * spec.height, encode, job.images[0], spec.width, spec.height, raw_fmt,
                                 spec.quality, settings.png)
        timing.add("encode", t)
        _count_images(metrics, raw_fmt, 1)
        seed = str(job.spec.seeds[0])
        return Response(data, media_type=MEDIA_TYPES[raw_fmt],
                        headers={"x-seed": seed, "x-job-id": job.id, "Server-Timing": timing.header(job)})
    return convert.generate_body(job, await _sync_files(job, settings.png, metrics, timing, response))


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
    job, job_id, wait_s = await _submit(spec, prefer=prefer, idem=idem, cancel_after=cancel_after,
                                        settings=settings, queue=queue, notifier=notifier, metrics=metrics,
                                        timing=timing, receive=request.receive, stream=stream)
    if stream:
        if job is None:
            raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
        return _event_response(_openai_stream(job, body.quality, time.monotonic() + wait_s, idem, settings, queue,
                                              metrics), job.id, metrics)
    if "respond-async" in (prefer or "").lower():
        return await _async_response(job, job_id, settings.png, queue, metrics)
    job = _raise_for(job, job_id)
    if body.response_format == "url":
        return await _url_response(job, body.quality, request, settings, queue, metrics, timing, response)
    _delivered(job, idem, settings, queue, background)
    return convert.openai_body(job, await _sync_files(job, settings.png, metrics, timing, response), body.quality)


def _event_response(events: AsyncIterator[bytes], job_id: str, metrics: MetricsDep) -> StreamingResponse:
    async def counted() -> AsyncIterator[bytes]:
        metrics.event_streams.inc()
        try:
            async for chunk in events:
                yield chunk
        finally:
            metrics.event_streams.dec()

    return StreamingResponse(counted(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-job-id": job_id})


async def _expire_if_live(job_id: str, queue: JobQueue, metrics: MetricsDep) -> Job | None:
    """A streamed job whose deadline passed first ends expired (as a synchronous one); the job now."""
    if await queue.terminate(job_id, "expired", DEADLINE_ERROR) in ("queued", "processing"):
        metrics.api_jobs.labels(status="expired").inc()
    return await queue.get(job_id)


async def _cancel_left(job_id: str, queue: JobQueue, metrics: MetricsDep) -> None:
    """The client of a streamed job left before its end: nobody reads the job, cancel it (shielded:
    this runs while the response task is being cancelled)."""
    with anyio.CancelScope(shield=True):
        if await queue.terminate(job_id, "canceled", DISCONNECT_ERROR) in ("queued", "processing"):
            metrics.api_jobs.labels(status="canceled").inc()


async def _native_events(job: Job, settings: SettingsDep, queue: JobQueue, metrics: MetricsDep, *,
                         deadline: float | None = None, owner: bool = False,
                         idem: str | None = None) -> AsyncIterator[bytes]:
    """Our event stream of a job (``job_events``), ending with ``completed`` (or the job's final
    status) and the job's body, images included. ``owner``: the stream is the request that made
    the job (``POST /generate`` with ``Accept: text/event-stream``), with its deadline: leaving
    first cancels the job and delivered images leave Redis, unless it sent an Idempotency-Key."""
    ended = False
    try:
        async for name, data in job_events(job, queue, settings.png, deadline):
            if name != "end":
                yield sse(name, data)
                continue
            ended = True
            final: Job | None = data["job"]
            if final is not None and not final.terminal:
                final = await _expire_if_live(job.id, queue, metrics)
            if final is None:
                yield sse("error", {"error": {"message": f"job {job.id} no longer exists", "type":
                                              "invalid_request_error", "param": "job_id", "code": "job_not_found"}})
                return
            drop = owner and _drops_delivered(idem, settings)
            if drop and final.status == "succeeded" and not final.images_dropped:
                files: list[bytes] | None = await _delivered_files(final, settings.png, metrics)
            else:
                files = await _job_files(final, settings.png, queue, metrics)
            yield sse("completed" if final.status == "succeeded" else final.status, convert.job_body(final, files))
            if drop and files:
                await queue.drop_images(job.id, len(files), events=True)
    finally:
        if owner and not ended and idem is None:
            await _cancel_left(job.id, queue, metrics)


async def _openai_stream(job: Job, quality: str | None, deadline: float, idem: str | None, settings: SettingsDep,
                         queue: JobQueue, metrics: MetricsDep) -> AsyncIterator[bytes]:
    """OpenAI's image streaming: ``image_generation.partial_image`` events, then one
    ``image_generation.completed`` per image (``image_index`` and ``seed`` are extensions), or an
    ``error`` event. The job has the synchronous deadline; a client that leaves first cancels it
    (unless it sent an Idempotency-Key), and the delivered images leave Redis as after a
    synchronous response."""
    sp, ended = job.spec, False
    shape = {"size": f"{sp.width}x{sp.height}", "quality": quality or "auto", "background": "opaque",
             "output_format": sp.output_format}
    try:
        async for name, data in job_events(job, queue, settings.png, deadline):
            if name == "partial_image":
                yield sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": data["b64_json"],
                    "created_at": int(time.time()), **shape, "partial_image_index": data["partial_image_index"],
                    "image_index": data["image_index"]})
            elif name == "":
                yield sse("", {})
            elif name == "end":
                ended = True
                final = data["job"]
                if final is not None and not final.terminal:  # the deadline passed first
                    final = await _expire_if_live(job.id, queue, metrics)
                if final is None or final.status != "succeeded" or final.images_dropped:
                    err = (final.error if final is not None else None) or {
                        "message": f"job {job.id} ended {final.status if final else 'and expired'}",
                        "type": "server_error", "param": None, "code": final.status if final else "job_not_found"}
                    yield sse("error", {"type": "error", "error": err})
                    return
                encoded = await _delivered_files(final, settings.png, metrics)
                out = convert.openai_body(final, encoded, quality)
                for i, item in enumerate(out["data"]):
                    yield sse("image_generation.completed", {
                        "type": "image_generation.completed", "b64_json": item["b64_json"],
                        "created_at": out["created"], **shape, "usage": out["usage"], "image_index": i,
                        "seed": item["seed"]})
                if _drops_delivered(idem, settings):
                    await queue.drop_images(job.id, len(encoded), events=True)
    finally:
        if not ended and idem is None:  # the client left: nobody reads this job
            await _cancel_left(job.id, queue, metrics)


async def _url_response(job: Job, quality: str | None, request: Request, settings: SettingsDep, queue: JobQueue,
                        metrics: MetricsDep, timing: Timing, response: Response) -> dict[str, Any]:
    """``response_format: "url"``: the files are encoded into the job's record (which keeps them,
    and its images, until its TTL) and answered as signed links to ``image_file``."""
    t = time.perf_counter()
    files = await _job_files(job, settings.png, queue, metrics)
    timing.add("encode", t)
    if files is None:  # an earlier synchronous response delivered and dropped them
        raise ApiError(410, f"the images of job {job.id} were already delivered", code="output_delivered")
    response.headers["Server-Timing"] = timing.header(job)
    base = settings.public_base_url or str(request.base_url).rstrip("/")
    expires = (job.completed_ms or job.created_ms) // 1000 + settings.job_ttl_s
    key = await queue.url_signing_key()
    ext = job.spec.output_format
    urls = [file_urls.signed_url(base, key, job.id, i, ext, expires) for i in range(len(files))]
    return convert.openai_body(job, files, quality, urls)


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
    return convert.job_body(job, await _job_files(job, settings.png, queue, metrics))


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

    return _event_response(_native_events(job, settings, queue, metrics), job.id, metrics)


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


@protected.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request, settings: SettingsDep) -> Any:
    """The served model (OpenAI list shape)."""
    return {"object": "list", "data": [{"id": settings.model_preset, "object": "model",
                                        "created": int(request.app.state.started_at), "owned_by": "ldserve"}]}


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


@public.get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


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
