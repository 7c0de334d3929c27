"""Pure ASGI middleware: x-request-id on every response, body-size limit, HTTP metrics, access log."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import ACCESS_LOGGER
from ..metrics import ApiMetrics

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)
QUIET_PATHS = ("/health/live", "/health/ready", "/metrics")
"""Logged at DEBUG: probes and scrapes come every few seconds."""


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics, max_body_bytes: int, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        rid = _request_id(scope)
        state: dict[str, Any] = {"status": 500, "started": False, "job": None}

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                headers = message.get("headers", [])
                if self.access_log:
                    state["job"] = next((v.decode("latin-1") for k, v in headers if k.lower() == b"x-job-id"), None)
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            await send(message)

        try:
            body_receive = await self._buffer_body(scope, receive, send_wrapped)
            if body_receive is not None:
                await self.app(scope, body_receive, send_wrapped)
        except Exception:
            log.exception("unhandled error (request %s)", rid)
            if not state["started"]:
                await _send_error(send_wrapped, 500, "internal server error", "internal_error")
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self._observe(scope, route, int(state["status"]), seconds)
            if self.access_log:
                _access(scope, route, int(state["status"]), seconds, rid, state["job"])

    async def _buffer_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Read the body up to the limit (413 beyond it) and replay it to the app."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await _send_error(send, 413, f"request body exceeds {self.max_body} bytes", "body_too_large")
            return None
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_body:
                await _send_error(send, 413, f"request body exceeds {self.max_body} bytes", "body_too_large")
                return None
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _observe(self, scope: Scope, route: str, status: int, seconds: float) -> None:
        self.metrics.http_requests.labels(route=route, method=scope["method"], status=str(status)).inc()
        self.metrics.request_duration.labels(route=route).observe(seconds)


def _access(scope: Scope, route: str, status: int, seconds: float, rid: str, job_id: str | None) -> None:
    """``route``: the matched route's template ("unmatched" if none)."""
    path = scope.get("path", "")
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if not access.isEnabledFor(level):
        return
    client = scope.get("client")
    ms = round(seconds * 1e3, 2)
    access.log(level, "%s %s %d %.1f ms %s%s", scope["method"], path, status, ms, rid,
               f" job={job_id}" if job_id else "",
               extra={"fields": {"method": scope["method"], "path": path, "route": route, "status": status,
                                 "duration_ms": ms, "request_id": rid, "job_id": job_id,
                                 "client": client[0] if client else None}})


def _request_id(scope: Scope) -> str:
    given = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return f"req_{uuid.uuid4().hex}"


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = _error_body(status, message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
