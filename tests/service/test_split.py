"""Split mode (`ldserve api` + `ldserve worker` processes): bounded queue, deadlines, crash recovery, drain."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from .conftest import AUTH, Proc, base_env, free_port, start, up, wait_for
from .test_e2e import decode, metric


@pytest.fixture(scope="module")
def split(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("split")
    prefix = f"split{uuid.uuid4().hex[:6]}"
    common = {"api_keys": "", "max_queue_len": 3, "claim_idle_ms": 1500, "max_deliveries": 3, "max_batch_size": 4,
              "log_format": "json"}
    api = start("api", base_env(redis_url, prefix, **common), tmp, port=free_port())
    wait_for(lambda: up(api.url), 30, "api up", api)
    procs: list[Proc] = [api]

    def worker() -> Proc:
        port = free_port()
        w = start("worker", base_env(redis_url, prefix, worker_metrics_port=port, **common), tmp)
        w.port = port
        procs.append(w)
        return w

    yield {"api": api, "worker": worker, "prefix": prefix, "tmp": tmp}
    for p in procs:
        p.stop()


def submit(api: Proc, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{api.url}/generate", json=body, headers={"Prefer": "respond-async", **(headers or {})},
                      timeout=30)


def job(api: Proc, job_id: str) -> dict:
    return httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=AUTH, timeout=30).json()


def wait_status(api: Proc, job_id: str, statuses: tuple[str, ...], timeout: float = 90) -> dict:
    out: dict = {}

    def check() -> bool:
        out.update(job(api, job_id))
        return out["status"] in statuses

    wait_for(check, timeout, f"job {job_id} in {statuses}", interval=0.05)
    return out


def test_event_stream_outlives_a_quiet_queue(split: dict) -> None:
    """A job's event stream stays open while nothing happens for longer than the Redis client's
    default socket timeout (redis-py 8: 5 s; the stream waits 15 s per read): it was cut at 5.3 s."""
    api = split["api"]
    job_id = submit(api, {"prompt": "nobody runs this yet"}).json()["id"]  # no worker: it waits
    threading.Timer(7.0, lambda: httpx.post(f"{api.url}/v1/jobs/{job_id}/cancel", timeout=10)).start()
    t0, events = time.monotonic(), []
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[0] == "status" and events[-1] == "canceled", events
    assert time.monotonic() - t0 >= 6.5


def test_not_ready_without_worker_then_429_on_full_queue(split: dict) -> None:
    api = split["api"]
    assert httpx.get(f"{api.url}/health/ready").status_code == 503
    ids = [submit(api, {"prompt": f"q{i}"}).json()["id"] for i in range(3)]
    r = submit(api, {"prompt": "one too many"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)  # as OpenAI SDK users see it
    with pytest.raises(openai.RateLimitError) as full:
        sdk.images.generate(prompt="one too many")
    assert full.value.code == "queue_full" and int(full.value.response.headers["retry-after"]) >= 1
    depth = httpx.get(f"{api.url}/metrics").text
    assert metric(depth, 'ldserve_queue_depth{state="waiting"}') == 3
    for i in ids:  # canceled jobs are dropped by the worker before the GPU
        assert httpx.post(f"{api.url}/v1/jobs/{i}/cancel").json()["status"] == "canceled"
    # a synchronous request waits up to its deadline (here Cancel-After, under SYNC_TIMEOUT_S), then 504
    t0 = time.monotonic()
    r = httpx.post(f"{api.url}/generate", json={"prompt": "nobody runs this"}, headers={"Cancel-After": "1s"},
                   timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert r.json()["error"]["type"] == "timeout_error" and 0.9 < time.monotonic() - t0 < 10
    late = job(api, r.headers["x-job-id"])
    assert late["status"] == "expired" and late["started_at"] is None


def test_deadline_expiry_before_the_gpu(split: dict, rclient: redis.Redis) -> None:
    api = split["api"]
    j = submit(api, {"prompt": "late"}, {"Cancel-After": "200ms", "Idempotency-Key": "late-1"}).json()
    time.sleep(0.4)
    w = split["worker"]()
    split["w1"] = w
    wait_for(lambda: httpx.get(f"{api.url}/health/ready").status_code == 200, 120, "worker ready", w)
    done = wait_status(api, j["id"], ("expired", "succeeded", "failed"))
    assert done["status"] == "expired" and done["started_at"] is None
    assert done["error"]["code"] == "deadline_exceeded"
    assert rclient.xlen(f"{split['prefix']}:jobs") == 0  # canceled + expired entries acked and deleted
    wm = httpx.get(f"http://127.0.0.1:{w.port}/metrics").text
    assert metric(wm, 'ldserve_jobs_total{status="expired"}') == 1
    for probe in ("ready", "live"):  # the probes the manifests use (tests/service/test_worker_http.py)
        assert httpx.get(f"http://127.0.0.1:{w.port}/health/{probe}").json() == {"status": "ok"}
    assert metric(wm, "ldserve_batch_size_count") == 0  # nothing reached the GPU
    retry = submit(api, {"prompt": "late"}, {"Idempotency-Key": "late-1"}).json()  # it gave no result: anew
    assert retry["id"] != j["id"] and wait_status(api, retry["id"], ("succeeded", "failed"))["status"] == "succeeded"
    assert submit(api, {"prompt": "late"}, {"Idempotency-Key": "late-1"}).json()["id"] == retry["id"]
    r = httpx.post(f"{api.url}/generate", json={"prompt": "sync in split mode"}, timeout=120)
    assert r.status_code == 200 and decode(r.json()["data"][0]["b64_json"]).size == (256, 256)
    am = httpx.get(f"{api.url}/metrics").text
    assert metric(am, "ldserve_results_in_process_total") == 0  # read from Redis
    assert metric(am, "ldserve_images_encoded_ahead_total") == 0 and metric(am, "ldserve_images_generated_total") >= 1


def test_sigkill_mid_job_is_reclaimed_by_another_worker(split: dict) -> None:
    api, w1 = split["api"], split["w1"]
    j = submit(api, {"prompt": "crash", "resolution": 512, "seed": 9}).json()
    wait_status(api, j["id"], ("processing",), timeout=30)
    w1.signal(signal.SIGKILL)
    w1.proc.wait()
    w2 = split["worker"]()
    split["w2"] = w2
    done = wait_status(api, j["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded" and done["seeds"] == [9]
    assert decode(done["output"][0]["b64_json"]).size == (512, 512)
    wm = httpx.get(f"http://127.0.0.1:{w2.port}/metrics").text
    assert metric(wm, "ldserve_redeliveries_total") == 1


def test_sigterm_drains_without_losing_jobs(split: dict, rclient: redis.Redis) -> None:
    api, w2 = split["api"], split["w2"]
    wait_for(lambda: httpx.get(f"{api.url}/health/ready").status_code == 200, 60, "w2 ready", w2)
    ids = [submit(api, {"prompt": f"drain {i}", "resolution": 512}).json()["id"] for i in range(3)]
    wait_status(api, ids[0], ("processing",), timeout=30)
    w2.signal(signal.SIGTERM)
    assert w2.proc.wait(120) == 0, w2.logs()
    statuses = [job(api, i)["status"] for i in ids]
    assert statuses[0] == "succeeded" and set(statuses) <= {"succeeded", "queued"}, statuses
    info = rclient.xpending(f"{split['prefix']}:jobs", "workers")
    assert info["pending"] == 0  # nothing stranded in the drained worker's PEL
    assert rclient.xlen(f"{split['prefix']}:jobs") == statuses.count("queued")
    for i in ids:  # leave the queue empty
        httpx.post(f"{api.url}/v1/jobs/{i}/cancel")


def test_json_logs(split: dict) -> None:
    """LOG_FORMAT=json: every line the API process wrote is one JSON object, uvicorn's included,
    and its access records carry the request's fields."""
    api = split["api"]
    assert httpx.get(f"{api.url}/v1/jobs/nope", headers={"x-request-id": "acc-json-1"}).status_code == 404
    wait_for(lambda: b"acc-json-1" in api.log.read_bytes(), 10, "access record", api)
    records = [json.loads(line) for line in api.log.read_text().splitlines() if line.strip()]
    assert any(r["logger"].startswith("uvicorn") for r in records)
    [rec] = [r for r in records if r.get("request_id") == "acc-json-1"]
    assert rec["logger"] == "ldserve.access" and rec["level"] == "info" and rec["method"] == "GET"
    assert rec["status"] == 404 and rec["route"] == "/v1/jobs/{job_id}" and rec["path"] == "/v1/jobs/nope"
    assert rec["duration_ms"] > 0 and rec["client"] == "127.0.0.1" and rec["ts"].endswith("Z")
    # the drained worker's batches, as records with their fields (test_sigterm_drains_without_losing_jobs)
    worker = [json.loads(line) for line in split["w2"].log.read_text().splitlines() if line.strip()]
    batches = [r for r in worker if r["logger"] == "service.worker" and r["msg"].startswith("batch of")]
    assert batches and all(r["job_ids"] and 0 < r["tokens_computed"] <= r["tokens_full"] for r in batches)
