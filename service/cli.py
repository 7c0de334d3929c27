"""``ldserve serve | api | worker``.

serve:  API + worker in one process (worker in a thread); embedded redis-server when no Redis URL.
api:    the HTTP API only (needs LDSERVE_REDIS_URL).
worker: one GPU worker (needs LDSERVE_REDIS_URL); metrics on its own port (worker_metrics_port).
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from . import logs
from .settings import ServiceSettings

log = logging.getLogger("ldserve")


class _Server(uvicorn.Server):
    """uvicorn server that flips the app to draining (readiness 503) as soon as a signal arrives and,
    with ``drain_delay_s``, keeps serving that long (readiness 503, so load balancers that poll it
    stop sending requests) before uvicorn closes its listener and drains; a second signal does not
    wait. uvicorn alone closes the listener at once, so readiness was never seen answering 503."""

    def __init__(self, config: uvicorn.Config, on_exit: Any = None, drain_delay_s: float = 0.0) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.drain_delay_s = drain_delay_s
        self._delayed: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None:
            self.on_exit()
        if self.drain_delay_s > 0 and self._delayed is None and not self.should_exit:
            log.info("draining: /health/ready answers 503; the listener closes in %.1f s", self.drain_delay_s)
            self._delayed = threading.Timer(self.drain_delay_s, super().handle_exit, (sig, frame))
            self._delayed.daemon = True
            self._delayed.start()
            return
        super().handle_exit(sig, frame)


def _settings(args: argparse.Namespace) -> ServiceSettings:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        return ServiceSettings(**overrides)
    except ValidationError as e:
        sys.exit(f"ldserve: invalid settings:\n{e}")


def _uvicorn_config(app: Any, s: ServiceSettings) -> uvicorn.Config:
    return uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, access_log=False, log_config=None,
                          timeout_graceful_shutdown=math.ceil(s.drain_timeout_s or s.sync_timeout_s + 5))


def _drain_then_exit_on_signals() -> None:
    """uvicorn restores the signal handlers it found when it has shut down, then raises the signal
    that stopped it once more: with the default SIGTERM handler that killed ``ldserve serve`` before
    its worker drained and its embedded redis-server stopped (left running, orphaned). Found as
    no-ops, that signal does nothing; a signal during the drain after it ends the process, through
    ``finally`` (the embedded Redis still stops)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


def _draining(app: Any, worker: Any) -> None:
    """``ldserve serve`` got a signal: readiness 503, and the worker runs no more calibrations (it still
    runs the jobs the API holds; it is told to stop claiming once the API has drained)."""
    app.state.draining = True
    worker.winding_down = True


def _exit_on_signal(sig: int, _frame: Any) -> None:
    log.warning("signal %d during the drain: exiting without waiting for the batch", sig)
    raise SystemExit(128 + sig)


def serve(s: ServiceSettings) -> None:
    from model_loader.checkpoint_report import CheckpointError

    from .embedded_redis import EmbeddedRedis
    from .main import create_app
    from .metrics import ApiMetrics, WorkerMetrics
    from .queue import LocalResults
    from .worker import Worker, worker_client

    embedded = EmbeddedRedis().start() if s.redis_url is None else None
    if embedded is not None:
        s = s.model_copy(update={"redis_url": embedded.url})
    sys.setswitchinterval(s.switch_interval_ms / 1000)  # API thread and worker thread share the GIL
    try:
        registry = CollectorRegistry()
        api_metrics = ApiMetrics(registry)
        local = LocalResults()
        worker = Worker(s, worker_client(s), WorkerMetrics(registry, jobs=api_metrics.api_jobs), local_results=local)
        app = create_app(s, metrics=api_metrics, local_results=local)
        server = _Server(_uvicorn_config(app, s), on_exit=lambda: _draining(app, worker), drain_delay_s=s.drain_delay_s)
        failed: list[BaseException] = []

        def stop_serving(why: BaseException) -> None:
            """A part of this process's service is gone: the API stops, and the process exits 1."""
            failed.append(why)
            app.state.draining = True
            server.should_exit = True

        def run_worker() -> None:
            """The worker's end ends the process: a model that fails to load (a missing file, a
            checkpoint that does not match) must not leave an API up that is never ready."""
            try:
                worker.run()
            except BaseException as e:  # noqa: BLE001 - reported below, after the API stopped
                expected = isinstance(e, (ValueError, OSError, CheckpointError))
                log.critical("worker failed, ldserve serve stops: %s: %s", type(e).__name__, e, exc_info=not expected)
                stop_serving(e)

        def watch_embedded_redis() -> None:
            """The embedded redis-server is part of this process's service: if it dies, every request
            would get 503 while /health/live said 200, so the process ends (its supervisor restarts it)."""
            while not server.should_exit:
                proc = embedded.proc if embedded is not None else None
                if proc is None:
                    return
                if proc.poll() is not None:
                    log.critical("the embedded redis-server exited (code %s); ldserve serve stops", proc.returncode)
                    stop_serving(RuntimeError(f"the embedded redis-server exited (code {proc.returncode})"))
                    worker.stop()
                    return
                time.sleep(0.5)

        thread = threading.Thread(target=run_worker, name="ldserve-worker", daemon=True)
        thread.start()
        if embedded is not None:
            threading.Thread(target=watch_embedded_redis, name="ldserve-redis-watch", daemon=True).start()
        _drain_then_exit_on_signals()
        server.run()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_on_signal)
        if not failed:
            log.info("API stopped; the worker finishes its batch")
        worker.stop()
        thread.join()
        if failed:
            sys.exit(f"ldserve serve: stopped: {type(failed[0]).__name__}: {failed[0]}")
    finally:
        if embedded is not None:
            embedded.stop()


def api(s: ServiceSettings) -> None:
    from .main import create_app

    if s.redis_url is None:
        sys.exit("ldserve api: set LDSERVE_REDIS_URL (only `ldserve serve` starts an embedded Redis)")
    app = create_app(s)
    _Server(_uvicorn_config(app, s), on_exit=lambda: setattr(app.state, "draining", True),
            drain_delay_s=s.drain_delay_s).run()


def worker(s: ServiceSettings) -> None:
    from .metrics import WorkerMetrics
    from .worker import Worker, worker_client
    from .worker_http import start_worker_http

    if s.redis_url is None:
        sys.exit("ldserve worker: set LDSERVE_REDIS_URL")
    registry = CollectorRegistry()
    w = Worker(s, worker_client(s), WorkerMetrics(registry))
    if s.worker_metrics_port:
        start_worker_http(s.host, s.worker_metrics_port, registry, lambda: w.serving, w.alive)
        log.info("worker metrics and probes on http://%s:%d (/metrics, /health/ready, /health/live)", s.host,
                 s.worker_metrics_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: w.stop())
    w.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ldserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "api", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    s = _settings(args)
    logs.configure(s.log_level, s.log_format)
    {"serve": serve, "api": api, "worker": worker}[args.command](s)


if __name__ == "__main__":
    main()
