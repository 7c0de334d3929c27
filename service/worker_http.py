"""``ldserve worker``'s own HTTP port: Prometheus metrics and the probes an orchestrator needs.

``/health/ready``: 200 once the model is loaded and warm, 503 before that and while draining (a
rollout then waits for the new worker to be warm before it stops an old one). ``/health/live``: 503
once a ready worker's loop has not moved for ``worker_stall_s``. Anything else: ``/metrics``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # probes every few seconds: not log lines


def health_app(registry: CollectorRegistry, ready: Callable[[], bool], alive: Callable[[], bool]) -> Callable:
    metrics = make_wsgi_app(registry)
    probes = {"/health/ready": ready, "/health/live": alive}

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics(environ, start_response)
        ok = probe()
        body = json.dumps({"status": "ok" if ok else "unavailable"}).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def start_worker_http(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool],
                      alive: Callable[[], bool]) -> WSGIServer:
    server = make_server(host, port, health_app(registry, ready, alive), _Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ldserve-worker-http", daemon=True).start()
    return server
