"""Server-sent event responses of a job: ours (``progress``, ``partial_image``, the end) and the
OpenAI image stream (``image_generation.partial_image`` / ``.completed``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from ..queue import Job, JobQueue
from . import convert
from .deps import MetricsDep, SettingsDep
from .events import job_events, sse
from .jobflow import cancel_left, delivered_files, drops_delivered, expire_if_live, job_files


def event_response(events: AsyncIterator[bytes], job_id: str, metrics: MetricsDep) -> StreamingResponse:
    async def counted() -> AsyncIterator[bytes]:
        metrics.event_streams.inc()
        try:
            async for chunk in events:
                yield chunk
        finally:
            metrics.event_streams.dec()

    return StreamingResponse(counted(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-job-id": job_id})


async def native_events(job: Job, settings: SettingsDep, queue: JobQueue, metrics: MetricsDep, *,
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
                final = await expire_if_live(job.id, queue, metrics)
            if final is None:
                yield sse("error", {"error": {"message": f"job {job.id} no longer exists", "type":
                                              "invalid_request_error", "param": "job_id", "code": "job_not_found"}})
                return
            drop = owner and drops_delivered(idem, settings)
            if drop and final.status == "succeeded" and not final.images_dropped:
                files: list[bytes] | None = await delivered_files(final, settings.png, metrics)
            else:
                files = await job_files(final, settings.png, queue, metrics)
            yield sse("completed" if final.status == "succeeded" else final.status, convert.job_body(final, files))
            if drop and files:
                await queue.drop_images(job.id, len(files), events=True)
    finally:
        if owner and not ended and idem is None:
            await cancel_left(job.id, queue, metrics)


async def openai_stream(job: Job, quality: str | None, deadline: float, idem: str | None, settings: SettingsDep,
                         queue: JobQueue, metrics: MetricsDep) -> AsyncIterator[bytes]:
    """OpenAI's image streaming: ``image_generation.partial_image`` events, then one
    ``image_generation.completed`` per image (``image_index``, ``seed``, the image's ``stats`` and the
    job's ``metrics`` are extensions), or an
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
                    final = await expire_if_live(job.id, queue, metrics)
                if final is None or final.status != "succeeded" or final.images_dropped:
                    err = (final.error if final is not None else None) or {
                        "message": f"job {job.id} ended {final.status if final else 'and expired'}",
                        "type": "server_error", "param": None, "code": final.status if final else "job_not_found"}
                    yield sse("error", {"type": "error", "error": err})
                    return
                encoded = await delivered_files(final, settings.png, metrics)
                out = convert.openai_body(final, encoded, quality)
                metrics_ = {k: v for k, v in out["metrics"].items() if k != "images"}
                for i, item in enumerate(out["data"]):
                    yield sse("image_generation.completed", {
                        "type": "image_generation.completed", "b64_json": item["b64_json"],
                        "created_at": int(time.time()), **shape, "usage": out["usage"], "image_index": i,
                        "seed": item["seed"], "stats": out["metrics"]["images"][i], "metrics": metrics_})
                if drops_delivered(idem, settings):
                    await queue.drop_images(job.id, len(encoded), events=True)
    finally:
        if not ended and idem is None:  # the client left: nobody reads this job
            await cancel_left(job.id, queue, metrics)
