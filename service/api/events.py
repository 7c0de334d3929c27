"""Server-sent events of a job: progress per scale, partial images, then its end.

The worker appends ``progress`` and ``partial_image`` entries to the job's event stream
(``Keys.job_events``) as the scales run; the script that ends a job appends its final status to
the same stream, so a reader that saw the job live needs no other wake-up. Readers start from the
stream's beginning, so a client that connects late (or reconnects) gets every event so far.
Partial images are encoded here, in the job's output format.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from ..imaging import PngParams, encode, run_encode
from ..queue import Job, JobQueue
from .jsonbody import Base64, dumps

KEEPALIVE_S = 15.0
"""An SSE comment this often while nothing happens, so proxies keep the connection."""

Event = tuple[str, dict[str, Any]]
"""(name, data); the name ``""`` is a keep-alive comment."""


def sse(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event (or a comment line for the keep-alive); ``data`` may hold ``Base64`` files."""
    if not name:
        return b": keep-alive\n\n"
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


async def job_events(job: Job, queue: JobQueue, png: PngParams, deadline: float | None = None) -> AsyncIterator[Event]:
    """``status`` (the job as first read), then ``progress`` and ``partial_image`` events as they
    come, then ``end`` with the job as last read (None if its record is gone), and stop.
    ``deadline`` (monotonic): stop with ``end`` at that time even if the job still runs."""
    yield "status", {"status": job.status}
    if job.terminal:
        yield "end", {"job": job}
        return
    sp, last = job.spec, "0"
    while True:
        left = KEEPALIVE_S if deadline is None else min(KEEPALIVE_S, deadline - time.monotonic())
        entries = await queue.read_events(job.id, last, block_ms=max(1, int(left * 1000))) if left > 0 else []
        if not entries:
            current = await queue.get(job.id)
            if current is None or current.terminal or (deadline is not None and time.monotonic() >= deadline):
                yield "end", {"job": current}
                return
            yield "", {}
            continue
        for eid, fields in entries:
            last = eid
            kind = fields[b"type"].decode()
            if kind in ("progress", "partial_image"):
                data = json.loads(fields[b"data"])
                if kind == "partial_image":
                    data["b64_json"] = Base64(await run_encode(data["width"] * data["height"], encode, fields[b"img"],
                                                            data["width"], data["height"], sp.output_format,
                                                            sp.quality, png))
                    data["output_format"] = sp.output_format
                yield kind, data
            else:  # the job's end, written with its final status
                yield "end", {"job": await queue.get(job.id)}
                return
