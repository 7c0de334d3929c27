"""A generation request's life in the API: admission, waiting (or the client leaving), deadlines, and
handing over its images (encoded once, counted once, dropped from Redis once delivered)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable

import anyio
from fastapi import BackgroundTasks, Response
from starlette.types import Receive

from ..imaging import PngParams, encode_all, run_encode
from ..queue import IdempotencyMismatch, Job, JobQueue, QueueFull
from ..spec import JobSpec
from . import convert, jsonbody
from .deps import MetricsDep, NotifierDep, QueueDep, SettingsDep
from .errors import ApiError

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


class ResponseFiles:
    """A synchronous response's image files: ``fmt`` at the job's size and quality. With ``ldserve
    serve`` they are encoded from the images the in-process worker hands over before storing them
    (``Notifier.wait``'s ``on_images``), so the encoding overlaps the worker's Redis write and the
    hand-over; those files are used only if the finished job holds the very same images. Otherwise
    (split mode, a job another request started) they are encoded from the job when asked."""

    def __init__(self, spec: JobSpec, fmt: str, png: PngParams, metrics: MetricsDep) -> None:
        self.spec, self.fmt, self.png, self.metrics = spec, fmt, png, metrics
        self._ahead: tuple[list[bytes], asyncio.Future[list[bytes]]] | None = None

    def start(self, images: list[bytes]) -> None:
        if self._ahead is None and len(images) == self.spec.n:
            task = asyncio.ensure_future(self._encode(self.spec, images))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # unused, a failure is no error
            self._ahead = (images, task)

    async def _encode(self, spec: JobSpec, images: list[bytes]) -> list[bytes]:
        return await run_encode(spec.width * spec.height * len(images), encode_all, images, spec.width, spec.height,
                                self.fmt, spec.quality, self.png)

    async def of(self, job: Job) -> list[bytes]:
        if self._ahead is not None and self._ahead[0] == job.images:
            self.metrics.images_encoded_ahead.inc(len(job.images))
            return await self._ahead[1]
        return await self._encode(job.spec, job.images)


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


async def submit(spec: JobSpec, *, prefer: str | None, idem: str | None, cancel_after: str | None,
                  settings: SettingsDep, queue: QueueDep, notifier: NotifierDep,
                  metrics: MetricsDep, timing: Timing, receive: Receive | None = None,
                  stream: bool = False, files: ResponseFiles | None = None,
                  drawn_seeds: bool = False) -> tuple[Job | None, str, float]:
    """Admit the job; for a synchronous request wait for it (``files``: to encode its images ahead
    when the in-process worker hands them over). A synchronous client that disconnects
    first (closed tab, client timeout before an SDK retry) cancels its job, so the GPU does not run
    work nobody will read: unless it sent an Idempotency-Key, whose retry attaches to the same job.
    ``stream``: admitted with the synchronous deadline, not waited for (the caller streams it).
    ``drawn_seeds``: the request had no seed (the server drew them), so a retry with the same
    Idempotency-Key matches without one and gets the first job's seeds."""
    is_async = "respond-async" in (prefer or "").lower()
    deadline = _duration(cancel_after)
    wait_s = settings.sync_timeout_s if deadline is None else min(deadline, settings.sync_timeout_s)
    timeout = deadline if is_async and not stream else wait_s
    try:
        t = time.perf_counter()
        job_id, _created = await queue.enqueue(spec, timeout_s=timeout, idempotency_key=idem,
                                                  drawn_seeds=drawn_seeds, owned=not is_async and idem is None)
        t = timing.add("enqueue", t)
    except QueueFull as e:
        raise ApiError(429, f"the queue is full ({e.depth} jobs); retry later", code="queue_full",
                       headers={"Retry-After": str(e.retry_after_s)}) from None
    except IdempotencyMismatch as e:
        raise ApiError(422, str(e), param="Idempotency-Key", code="idempotency_key_reused") from None
    if is_async or stream:
        return await queue.get(job_id), job_id, wait_s
    job, gone = await _wait_unless_gone(notifier.wait(job_id, wait_s, files.start if files else None), receive)
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


def raise_for(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
    if job.status == "succeeded":
        return job
    err = job.error or {}
    status = {"expired": 504, "canceled": 409}.get(job.status, 500)
    raise ApiError(status, err.get("message") or f"job {job.status}", code=err.get("code") or job.status,
                   type_=err.get("type"), headers={"x-job-id": job.id})  # (its record stays readable)


async def async_response(job: Job | None, job_id: str, png: PngParams, queue: JobQueue,
                          metrics: MetricsDep) -> Response:
    if job is None:
        raise ApiError(404, f"job {job_id} no longer exists", code="job_not_found")
    files = await job_files(job, png, queue, metrics)
    return jsonbody.response(convert.job_body(job, files), status_code=202,
                             headers={"Location": f"/v1/jobs/{job.id}", "x-job-id": job.id,
                                      "Preference-Applied": "respond-async"})



async def _encode_images(job: Job, png: PngParams) -> list[bytes]:
    return await run_encode(job.spec.width * job.spec.height * len(job.images), convert.encoded_images,
                             job, png)


def count_images(metrics: MetricsDep, fmt: str, n: int) -> None:
    metrics.images_generated.labels(output_format=fmt).inc(n)


def drops_delivered(idem: str | None, settings: SettingsDep) -> bool:
    """Whether a response that delivers a job's images (synchronous or streamed) then drops them
    from Redis (3 MB of raw RGB per 1024 px image; the record stays): unless an Idempotency-Key's
    retry may come for them, or ``keep_delivered_images``."""
    return idem is None and not settings.keep_delivered_images


def delivered(job: Job, idem: str | None, settings: SettingsDep, queue: JobQueue,
               background: BackgroundTasks) -> None:
    """Once a synchronous response is sent, its job's images leave Redis (``drops_delivered``)."""
    if drops_delivered(idem, settings):
        background.add_task(queue.drop_images, job.id, len(job.images))


async def job_files(job: Job, png: PngParams, queue: JobQueue, metrics: MetricsDep) -> list[bytes] | None:
    """A job read's files: None unless it succeeded with its images still stored; encoded by the
    first read and kept in the job hash (clients poll; a 1024 px PNG is ~85 ms of CPU), counted
    once in ``images_generated``."""
    if job.status != "succeeded" or job.images_dropped:
        return None
    if job.files:
        return job.files
    encoded = await _encode_images(job, png)
    if await queue.store_files(job.id, encoded) == 1:
        count_images(metrics, job.spec.output_format, len(encoded))
    return encoded


async def delivered_files(job: Job, png: PngParams, metrics: MetricsDep) -> list[bytes]:
    """Files a response hands over once (synchronous or streamed, not kept in the job): encoded, counted."""
    encoded = await _encode_images(job, png)
    count_images(metrics, job.spec.output_format, len(encoded))
    return encoded


async def sync_files(job: Job, files: ResponseFiles, metrics: MetricsDep, timing: Timing) -> list[bytes]:
    """A synchronous response's files (handed over once: counted), timed as ``encode``."""
    t = time.perf_counter()
    encoded = await files.of(job)
    count_images(metrics, files.fmt, len(encoded))
    timing.add("encode", t)
    return encoded


def sync_headers(job: Job, timing: Timing) -> dict[str, str]:
    """A synchronous response's ``x-job-id``, and its phases so far as ``Server-Timing``."""
    return {"x-job-id": job.id, "Server-Timing": timing.header(job)}


async def expire_if_live(job_id: str, queue: JobQueue, metrics: MetricsDep) -> Job | None:
    """A streamed job whose deadline passed first ends expired (as a synchronous one); the job now."""
    if await queue.terminate(job_id, "expired", DEADLINE_ERROR) in ("queued", "processing"):
        metrics.api_jobs.labels(status="expired").inc()
    return await queue.get(job_id)


async def cancel_left(job_id: str, queue: JobQueue, metrics: MetricsDep) -> None:
    """The client of a streamed job left before its end: nobody reads the job, cancel it (shielded:
    this runs while the response task is being cancelled)."""
    with anyio.CancelScope(shield=True):
        if await queue.terminate(job_id, "canceled", DISCONNECT_ERROR) in ("queued", "processing"):
            metrics.api_jobs.labels(status="canceled").inc()
