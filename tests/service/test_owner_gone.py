"""Jobs whose only reader was a client of an API process that died (SIGKILL: its connections went with
it) are dropped before the GPU, or stopped between scales, instead of run for nobody (ApiLease)."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import redis

from .conftest import Proc, base_env, free_port, ready, start, up, wait_for
from .test_e2e import metric

COMMON = {"api_keys": "", "api_lease_s": 1, "claim_idle_ms": 1500, "max_batch_size": 4,
          "calibrate_realized_speedup": "false"}


def _api(redis_url: str, prefix: str, tmp: Path) -> Proc:
    api = start("api", base_env(redis_url, prefix, **COMMON), tmp, port=free_port())
    wait_for(lambda: up(api.url), 30, "api up", api)
    return api


def _post_in_background(api: Proc, body: dict, headers: dict | None = None) -> None:
    """A synchronous client whose connection dies with the API process (its error is expected)."""
    def post() -> None:
        try:
            httpx.post(f"{api.url}/generate", json=body, headers=headers or {}, timeout=120)
        except httpx.HTTPError:
            pass
    threading.Thread(target=post, daemon=True).start()


def _jobs(r: redis.Redis, prefix: str) -> dict[str, dict[bytes, bytes]]:
    """job id -> its hash, for every job of this prefix (the jobs a dead API's clients never learnt the id of)."""
    out = {}
    for k in r.scan_iter(f"{prefix}:job:*"):
        out[k.decode().rsplit(":", 1)[1]] = r.hgetall(k)
    return out


def _kill(api: Proc, r: redis.Redis, prefix: str) -> None:
    api.signal(signal.SIGKILL)
    api.proc.wait()
    wait_for(lambda: not list(r.scan_iter(f"{prefix}:api:*")), 10, "the dead API's lease to lapse")


def test_jobs_of_a_killed_api_are_dropped_before_the_gpu(redis_url: str, rclient: redis.Redis,
                                                         tmp_path: Path) -> None:
    prefix = f"own{uuid.uuid4().hex[:6]}"
    doomed = _api(redis_url, prefix, tmp_path)
    _post_in_background(doomed, {"prompt": "sync, nobody left to read it", "seed": 1})
    _post_in_background(doomed, {"prompt": "idempotent: a retry may come", "seed": 2},
                        {"Idempotency-Key": "own-idem-1"})
    kept = httpx.post(f"{doomed.url}/generate", json={"prompt": "async: polled later", "seed": 3},
                      headers={"Prefer": "respond-async"}, timeout=30).json()["id"]
    wait_for(lambda: len(_jobs(rclient, prefix)) == 3, 30, "three jobs queued (no worker yet)", doomed)
    owners = {j: h.get(b"owner", b"").decode() for j, h in _jobs(rclient, prefix).items()}
    assert sorted(bool(o) for o in owners.values()) == [False, False, True]  # only the plain sync job is owned
    [orphan] = [j for j, o in owners.items() if o]
    _kill(doomed, rclient, prefix)

    live = _api(redis_url, prefix, tmp_path)
    port = free_port()
    worker = start("worker", base_env(redis_url, prefix, worker_metrics_port=port, **COMMON), tmp_path)
    try:
        wait_for(lambda: ready(live.url), 120, "worker ready", worker)
        # the live API's own synchronous job runs: its lease holds
        r = httpx.post(f"{live.url}/generate", json={"prompt": "sync on a live API", "seed": 4}, timeout=120)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{live.url}/v1/jobs/{kept}", timeout=10).json()["status"] == "succeeded"
        jobs = _jobs(rclient, prefix)
        statuses = {j: h[b"status"].decode() for j, h in jobs.items()}
        assert statuses.pop(orphan) == "canceled", statuses
        assert set(statuses.values()) == {"succeeded"}, statuses  # the async, idempotent and live jobs
        assert json.loads(jobs[orphan][b"error"])["code"] == "owner_gone"
        assert b"started_ms" not in jobs[orphan]  # never reached the GPU
        wm = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert metric(wm, 'ldserve_jobs_total{status="canceled"}') == 1
        assert metric(wm, 'ldserve_jobs_total{status="succeeded"}') == 3
        assert rclient.xlen(f"{prefix}:jobs") == 0
    finally:
        worker.stop()
        live.stop()


def test_a_running_job_of_a_killed_api_stops_between_scales(redis_url: str, rclient: redis.Redis,
                                                            tmp_path: Path) -> None:
    prefix = f"own{uuid.uuid4().hex[:6]}"
    api = _api(redis_url, prefix, tmp_path)
    port = free_port()
    worker = start("worker", base_env(redis_url, prefix, worker_metrics_port=port, **COMMON), tmp_path)
    try:
        wait_for(lambda: ready(api.url), 120, "worker ready", worker)
        # 2 x 1024 px: seconds of scales, then seconds of decode on a CPU (the decode stops too)
        _post_in_background(api, {"prompt": "a long one", "resolution": 1024, "n": 2, "seed": 5})

        def processing() -> bool:
            return any(h.get(b"status") == b"processing" for h in _jobs(rclient, prefix).values())

        wait_for(processing, 30, "the job on the device", worker, interval=0.02)
        t0 = time.monotonic()
        _kill(api, rclient, prefix)
        [(job_id, h)] = _jobs(rclient, prefix).items()
        wait_for(lambda: rclient.hget(f"{prefix}:job:{job_id}", "status") != b"processing", 30, "the job's end",
                 worker)
        h = rclient.hgetall(f"{prefix}:job:{job_id}")
        assert h[b"status"] == b"canceled" and json.loads(h[b"error"])["code"] == "owner_gone", h.get(b"error")
        assert b"img0" not in h
        wait_for(lambda: metric(httpx.get(f"http://127.0.0.1:{port}/metrics").text,
                                "ldserve_batches_abandoned_total") == 1, 30, "the batch abandoned", worker)
        wm = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert metric(wm, 'ldserve_jobs_total{status="canceled"}') == 1
        assert metric(wm, "ldserve_batch_size_count") == 0  # no batch ran to its end
        assert time.monotonic() - t0 < 20
        assert rclient.xlen(f"{prefix}:jobs") == 0 and rclient.xpending(f"{prefix}:jobs", "workers")["pending"] == 0
    finally:
        worker.stop()
        api.stop()
