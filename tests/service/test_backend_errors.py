"""The queue backend failing under a running `ldserve api`: Redis refusing writes (out of memory with
noeviction, as the shipped manifests configure it) and Redis gone. Clients get 503 + Retry-After in
the OpenAI envelope, nothing half-accepted is left behind, and the API recovers with Redis."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.embedded_redis import EmbeddedRedis

from .conftest import Proc, base_env, free_port, ready, start, up, wait_for


@pytest.fixture
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedRedis, Proc, str]]:
    server = EmbeddedRedis().start()  # its own server: this test stops it
    prefix = f"be{uuid.uuid4().hex[:6]}"
    api = start("api", base_env(server.url, prefix, api_keys=""), tmp_path_factory.mktemp("backend"), port=free_port())
    try:
        wait_for(lambda: up(api.url), 30, "api up", api)
        yield server, api, prefix
    finally:
        api.stop()
        server.stop()


def generate(api: Proc) -> httpx.Response:
    return httpx.post(f"{api.url}/generate", json={"prompt": "x"}, headers={"Prefer": "respond-async"}, timeout=30)


def test_backend_full_then_gone_answers_503_and_recovers(backend: tuple[EmbeddedRedis, Proc, str]) -> None:
    server, api, prefix = backend
    r = redis.Redis.from_url(server.url)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")  # every write is refused with an OOM reply
    full = generate(api)
    assert full.status_code == 503 and full.headers["retry-after"] == "5", full.text
    assert full.json()["error"]["code"] == "queue_backend_full" and "x-request-id" in full.headers
    assert r.xlen(f"{prefix}:jobs") == 0 and not r.keys(f"{prefix}:job:*")  # nothing half-accepted

    r.config_set("maxmemory", "0")
    assert generate(api).status_code == 202  # recovers with the backend, no restart

    server.stop()
    gone = generate(api)
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "queue_backend_unavailable"
    assert gone.json()["error"]["type"] == "server_error"
    assert httpx.get(f"{api.url}/v1/jobs/abc").status_code == 503
    assert httpx.get(f"{api.url}/health/ready").status_code == 503
    assert httpx.get(f"{api.url}/health/live").status_code == 200


def _ready_then_submit(backend: tuple[EmbeddedRedis, Proc, str], worker: Proc,
                       body: dict) -> tuple[redis.Redis, str, str]:
    """Wait for the worker, let Redis refuse writes when told (noeviction), submit an async job:
    (client, job id, job key)."""
    server, api, prefix = backend
    wait_for(lambda: httpx.get(f"{api.url}/health/ready").status_code == 200, 120, "worker ready", worker)
    r = redis.Redis.from_url(server.url)
    r.config_set("maxmemory-policy", "noeviction")
    job_id = httpx.post(f"{api.url}/generate", json=body, headers={"Prefer": "respond-async"}, timeout=30).json()["id"]
    return r, job_id, f"{prefix}:job:{job_id}"


def test_worker_survives_redis_refusing_its_result(backend: tuple[EmbeddedRedis, Proc, str],
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Redis fills up while a job runs, so storing its result fails: the worker neither dies nor keeps
    the job to itself; once memory is back, the job is reclaimed, run again and succeeds."""
    server, api, prefix = backend
    w = start("worker", base_env(server.url, prefix, api_keys="", claim_idle_ms=1500, worker_metrics_port=0),
              tmp_path_factory.mktemp("backend_worker"))
    try:
        r, job_id, key = _ready_then_submit(backend, w, {"prompt": "full", "resolution": 512})
        wait_for(lambda: r.hget(key, "status") == b"processing", 30, "job processing", w, interval=0.01)
        r.config_set("maxmemory", "1")  # the result's write will be refused
        wait_for(lambda: b"queue backend error" in w.log.read_bytes(), 60, "the refused store", w)
        r.config_set("maxmemory", "0")
        wait_for(lambda: r.hget(key, "status") == b"succeeded", 60, "job succeeded after reclaim", w)
        assert int(r.hget(key, "deliveries")) == 2 and r.hexists(key, "img0")
        assert w.proc.poll() is None and httpx.get(f"{api.url}/health/ready").status_code == 200
    finally:
        w.stop()


def test_refused_progress_events_do_not_fail_the_batch(backend: tuple[EmbeddedRedis, Proc, str],
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """Redis refuses writes for a moment mid-batch: the progress events of those scales are lost,
    the job is not (it succeeds on its first delivery once Redis takes writes again)."""
    server, api, prefix = backend
    w = start("worker", base_env(server.url, prefix, api_keys="", worker_metrics_port=0),
              tmp_path_factory.mktemp("progress_worker"))
    try:  # 4 x 512 px: ~0.8 s of scales between the first and the last progress write
        r, job_id, key = _ready_then_submit(backend, w, {"prompt": "progress", "resolution": 512, "n": 4})
        wait_for(lambda: r.exists(f"{prefix}:jobevents:{job_id}"), 30, "first progress event", w, interval=0.005)
        r.config_set("maxmemory", "1")
        wait_for(lambda: b"could not write progress events" in w.log.read_bytes(), 30, "a refused event", w,
                 interval=0.005)
        r.config_set("maxmemory", "0")
        wait_for(lambda: r.hget(key, "status") in (b"succeeded", b"failed"), 60, "the job's end", w)
        assert r.hget(key, "status") == b"succeeded" and int(r.hget(key, "deliveries")) == 1
    finally:
        w.stop()


def test_worker_and_waiters_recover_when_redis_comes_back_empty(backend: tuple[EmbeddedRedis, Proc, str],
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Redis loses everything (a restart without persistence, a flush, a failover to an empty replica):
    the worker creates the job stream's consumer group again and runs new jobs. It read NOGROUP for
    good before, while the API and its own heartbeat still said ready."""
    server, api, prefix = backend
    w = start("worker", base_env(server.url, prefix, api_keys="", worker_metrics_port=0),
              tmp_path_factory.mktemp("empty_worker"))
    try:
        wait_for(lambda: httpx.get(f"{api.url}/health/ready").status_code == 200, 120, "worker ready", w)
        redis.Redis.from_url(server.url).flushall()
        r = httpx.post(f"{api.url}/generate", json={"prompt": "after the flush"}, timeout=60)
        assert r.status_code == 200, (r.text, w.logs())
        assert b"consumer group was gone" in w.log.read_bytes()
    finally:
        w.stop()


@pytest.mark.parametrize("mode", ["serve", "split"])
def test_sync_waiters_ride_out_a_redis_restart(tmp_path: Path, mode: str) -> None:
    """Redis (with its data: AOF) is killed and back a little later while a synchronous request's job
    runs: the request still gets its images. Its waiter answered 503 at once before, although the job
    had been accepted, then ran and kept its images in Redis for nobody. Split: Redis stays down
    longer than the API's lease (1 s), which lapses meanwhile; the worker waits for live APIs to renew
    before it judges owners (it canceled the job as owner_gone as soon as Redis was back)."""
    from service.embedded_redis import redis_server_binary

    port = free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(tmp_path)]
    url = f"redis://127.0.0.1:{port}/0"

    def redis_up() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _pings(url), 10, "redis-server up")
        return proc

    server = redis_up()
    env = base_env(url, "restart", api_keys="", claim_idle_ms=1500, api_lease_s=1)
    serve = start("serve" if mode == "serve" else "api", env, tmp_path, port=free_port())
    worker = start("worker", {**env, "LDSERVE_WORKER_METRICS_PORT": "0"}, tmp_path) if mode == "split" else None
    try:
        wait_for(lambda: ready(serve.url), 120, "ready", worker or serve)
        got: dict[str, httpx.Response] = {}
        client = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
            f"{serve.url}/generate", json={"prompt": "through a restart", "resolution": 512, "n": 4}, timeout=120)))
        client.start()
        r = redis.Redis.from_url(url)
        wait_for(lambda: any(r.hget(k, "status") == b"processing" for k in r.keys("restart:job:*")), 30,
                 "the job processing", serve, interval=0.01)
        server.kill()
        server.wait()
        time.sleep(1.0 if mode == "serve" else 2.5)
        server = redis_up()
        client.join(120)
        assert got["r"].status_code == 200, (got["r"].text, serve.logs(), worker.logs() if worker else "")
        assert len(got["r"].json()["data"]) == 4
    finally:
        if worker is not None:
            worker.stop()
        serve.stop()
        server.kill()
        server.wait()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False
