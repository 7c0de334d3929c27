"""`ldserve worker`'s probes on its metrics port, on a real worker (tiny-2b, real Redis): not ready
while the model loads, ready once warm, not live while its loop is stuck in a device call, live again
once it returns, not ready while draining."""

from __future__ import annotations

import asyncio
import threading
import uuid

import httpx
import redis.asyncio as aredis
from prometheus_client import CollectorRegistry

from service.engine_client import EngineClient
from service.keys import Keys
from service.metrics import WorkerMetrics
from service.queue import JobQueue, ensure_group
from service.settings import ServiceSettings
from service.worker import Worker, worker_client
from service.worker_http import start_worker_http

from .conftest import free_port, wait_for
from .test_units import spec


class GatedEngine(EngineClient):
    """The real engine, whose load and whose next batch wait until the test lets them go: what a
    slow model load and a stuck device call look like from the worker's loop."""

    load_gate = threading.Event()
    batch_gate = threading.Event()
    in_batch = threading.Event()

    def __init__(self, settings: ServiceSettings) -> None:
        assert self.load_gate.wait(60)
        super().__init__(settings)

    def generate(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.in_batch.set()
        assert self.batch_gate.wait(60)
        return super().generate(*args, **kwargs)


def test_worker_probes(redis_url: str) -> None:
    prefix = f"probe{uuid.uuid4().hex[:6]}"
    s = ServiceSettings(redis_url=redis_url, key_prefix=prefix, model_preset="tiny-2b", worker_stall_s=1.0,
                        calibrate_realized_speedup=False, _env_file=None)
    w = Worker(s, worker_client(s), WorkerMetrics(CollectorRegistry()), engine_factory=GatedEngine)
    port = free_port()
    server = start_worker_http("127.0.0.1", port, w.metrics.registry, lambda: w.serving, w.alive)
    base = f"http://127.0.0.1:{port}"
    code = lambda path: httpx.get(f"{base}{path}", timeout=5).status_code  # noqa: E731
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    try:
        assert code("/health/ready") == 503 and code("/health/live") == 200  # loading: not ready, alive
        GatedEngine.load_gate.set()
        wait_for(lambda: code("/health/ready") == 200, 60, "worker ready")
        assert code("/health/live") == 200 and "ldserve_model_info{" in httpx.get(f"{base}/metrics").text

        async def admit() -> None:
            c = aredis.Redis.from_url(redis_url)
            try:
                await ensure_group(c, Keys(prefix))
                await JobQueue(c, Keys(prefix), max_len=10, job_ttl_s=60).enqueue(spec(), timeout_s=60,
                                                                                 idempotency_key=None)
            finally:
                await c.aclose()

        asyncio.run(admit())
        assert GatedEngine.in_batch.wait(30)
        wait_for(lambda: code("/health/live") == 503, 10, "a stuck worker to count as not live")
        GatedEngine.batch_gate.set()
        wait_for(lambda: code("/health/live") == 200, 30, "live again once the batch moves")
        w.stop()
        assert code("/health/ready") == 503  # draining
    finally:
        GatedEngine.load_gate.set()
        GatedEngine.batch_gate.set()
        w.stop()
        thread.join(60)
        server.shutdown()
