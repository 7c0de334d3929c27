"""Pure functions, settings, torch-freeness of the API and dead-lettering (real Redis, no engine)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import redis
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from model_loader.schedules import final_grid
from service.batching import Held, select_batch, should_dispatch
from service.keys import Keys
from service.metrics import WorkerMetrics
from service.settings import ServiceSettings
from service.sizing import ModelSizes, SizeError, resolve_size
from service.spec import JobSpec
from service.worker import Worker
from service.worker_queue import Entry, WorkerQueue

from .conftest import ROOT


def spec(n: int = 1, pn: str = "0.06M", h_div_w: float = 1.0) -> JobSpec:
    return JobSpec(prompt="p", seeds=list(range(n)), h_div_w=h_div_w, pn=pn, width=256, height=256, cfg=3, tau=1,
                   top_k=900, top_p=0.97, pruning=None, pruning_label="off")


def held(created: int, **kw: object) -> Held:
    return Held(Entry(f"{created}-0", uuid.uuid4().hex, claimed_at=float(created), created_ms=created), spec(**kw))


def test_resolve_size() -> None:
    official = ModelSizes(("0.25M", "1M"), "1M")
    tiny = ModelSizes(("0.06M", "0.25M", "1M"), "0.06M")
    r = resolve_size(width=1024, height=576, aspect_ratio=None, resolution=None, sizes=official)
    assert (r.pn, r.h_div_w) == ("1M", 0.571) and r.width > r.height
    r = resolve_size(width=None, height=None, aspect_ratio="1:2", resolution=512, sizes=official)
    assert (r.pn, r.h_div_w, r.height) == ("0.25M", 2.0, 46 * 16)
    r = resolve_size(width=None, height=None, aspect_ratio=None, resolution=None, sizes=tiny)
    assert (r.width, r.height, r.pn) == (256, 256, "0.06M")
    for kw in ({"width": 256, "height": 256, "resolution": None, "sizes": official},  # 256 only for tiny models
               {"width": 300, "height": None, "resolution": None, "sizes": tiny},
               {"width": None, "height": None, "resolution": 256, "sizes": official}):
        with pytest.raises(SizeError):
            resolve_size(aspect_ratio=None, **kw)  # type: ignore[arg-type]


def test_resolve_size_follows_pixels_per_token() -> None:
    """A model with 8-px tokens (the demo) draws its 16x16-token key at 128 px and refuses other keys."""
    demo = ModelSizes(("0.06M",), "0.06M", pixels_per_token=8)
    assert demo.resolutions == {128: "0.06M"}
    r = resolve_size(width=None, height=None, aspect_ratio="16:9", resolution=None, sizes=demo)
    assert r.pn == "0.06M" and r.width == final_grid(r.h_div_w, "0.06M")[1] * 8 and r.width > r.height
    assert resolve_size(width=130, height=125, aspect_ratio=None, resolution=None, sizes=demo).width == 128
    for kw in ({"width": 256, "height": 256, "resolution": None}, {"width": None, "height": None, "resolution": 256}):
        with pytest.raises(SizeError):
            resolve_size(aspect_ratio=None, sizes=demo, **kw)  # type: ignore[arg-type]


def test_batching_fifo_by_key_and_max_wait() -> None:
    a, b, c, d = held(1), held(2, pn="0.25M"), held(3, n=2), held(4, n=2)
    batch, rest = select_batch([d, c, b, a], max_images=4)
    assert batch == [a, c] and set(map(id, rest)) == {id(b), id(d)}
    assert should_dispatch([a, c, d], max_images=4, max_wait_s=10, now=1.0)  # full
    assert not should_dispatch([a], max_images=4, max_wait_s=0.5, now=1.2)
    assert should_dispatch([a], max_images=4, max_wait_s=0.5, now=1.6)  # waited long enough
    assert not should_dispatch([a, b], max_images=4, max_wait_s=10, now=1.0)  # another key does not fill it
    assert should_dispatch([c, d, held(5)], max_images=4, max_wait_s=10, now=3.0)  # same-key overflow: full
    big, _ = select_batch([held(1, n=4), held(2, n=4)], max_images=2)
    assert len(big) == 1  # the oldest job always runs, even above the limit


def test_settings_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDSERVE_API_KEYS", "k" * 20 + ", " + "j" * 20)
    s = ServiceSettings()
    assert len(s.api_key_hashes) == 2 and "k" * 20 not in s.api_key_hashes
    for bad in ({"model_preset": "nope"}, {"default_pruning": "turbo"}, {"api_keys": "short"},
                {"cors_origins": "*"}, {"max_batch_size": 2, "max_n": 4}, {"transformer_path": "/x"},
                {"switch_interval_ms": 0}, {"public_base_url": "images.example.com"},
                {"public_base_url": "https://x.example/?a=1"}, {"model_aliases": "dall e 3"},
                {"dtype_policy": "bf16"}, {"transformer_path": "/x", "vae_path": " "}, {"job_ttl_s": 20},
                {"heartbeat_s": 8}, {"api_lease_s": 2, "heartbeat_s": 1}):
        with pytest.raises(ValidationError):
            ServiceSettings(**bad)  # type: ignore[arg-type]
    assert ServiceSettings(public_base_url="https://x.example/").public_base_url == "https://x.example"
    home = ServiceSettings(transformer_path="~/t.pth", vae_path="~/v.pth", text_encoder_path="")
    assert not home.transformer_path.startswith("~") and home.vae_path.endswith("/v.pth")
    assert home.text_encoder_path is None  # empty: unset, not the current folder
    assert ServiceSettings(model_aliases=" dall-e-3,gpt-image-1,dall-e-3").model_aliases == ["dall-e-3", "gpt-image-1"]
    # pruning of requests that name none: the model preset's unless set
    assert ServiceSettings(model_preset="demo").pruning_default == "light"
    assert ServiceSettings(model_preset="tiny-2b").pruning_default == "balanced"
    assert ServiceSettings(model_preset="demo", default_pruning="fast").pruning_default == "fast"


def test_file_link_signature_covers_job_file_and_expiry() -> None:
    """A link is valid until its expiry; any change to job, file, expiry or key invalidates it (an
    altered expiry reads as invalid, not as expired); a signature of any text is an answer, not an error."""
    from service.file_urls import check, signature, signed_url

    key, job, t = b"k" * 32, "a" * 32, 1_000_000
    url = signed_url("https://x.example", key, job, 1, "png", t)
    sig = url.rsplit("signature=", 1)[1]
    assert url == f"https://x.example/v1/images/files/{job}/1.png?expires={t}&signature={sig}" and len(sig) == 32
    assert check(key, job, "1.png", t, sig, now=t) is None
    assert check(key, job, "1.png", t, sig.upper(), now=t - 5) is None
    assert check(key, job, "1.png", t, sig, now=t + 1) == "url_expired"
    for args in ((b"j" * 32, job, "1.png", t), (key, "b" * 32, "1.png", t), (key, job, "0.png", t),
                 (key, job, "1.webp", t), (key, job, "1.png", t + 1)):
        assert check(*args, sig, now=t - 5) == "invalid_signature"
    assert check(key, job, "1.png", t, "é" * 32, now=t) == "invalid_signature"
    assert signature(key, job, "1.png", t) != signature(key, job, "1.png", t + 1)


def test_api_process_never_imports_torch() -> None:
    code = ("import sys; from service.main import create_app; from service.settings import ServiceSettings;"
            "from service.cli import main; "
            "create_app(ServiceSettings(redis_url='redis://127.0.0.1:1')).openapi();"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _read_by_a_dead_worker(redis_url: str, *job_ids: str) -> tuple[redis.Redis, ServiceSettings, Keys, WorkerQueue]:
    """Queued jobs whose entries a worker (``dead-1``) read and then died with; reclaimable at once."""
    client = redis.Redis.from_url(redis_url)
    settings = ServiceSettings(redis_url=redis_url, key_prefix=f"dw{uuid.uuid4().hex[:6]}", claim_idle_ms=100,
                               max_deliveries=2)
    keys = Keys(settings.key_prefix)
    q = WorkerQueue(client, keys, job_ttl_s=60)
    q.ensure_group()
    for j in job_ids:
        client.hset(keys.job(j), mapping={"status": "queued", "created_ms": 1, "spec": spec().model_dump_json()})
        client.xadd(keys.stream, {"job_id": j, "deadline_ms": 0})
    assert [e.job_id for e in q.read_new("dead-1", 10, None)] == list(job_ids)
    return client, settings, keys, q


def test_dead_letter_after_max_deliveries(redis_url: str) -> None:
    client, settings, keys, q = _read_by_a_dead_worker(redis_url, "j1")
    client.xclaim(keys.stream, keys.group, "dead-2", 0, [client.xpending_range(keys.stream, keys.group, "-", "+", 1)[
        0]["message_id"]])  # a second worker took it and died too
    worker = Worker(settings, client, WorkerMetrics(CollectorRegistry()), consumer="rescuer")
    try:
        time.sleep(0.15)
        worker._recover()
        assert client.hget(keys.job("j1"), "status") == b"failed"
        err = json.loads(client.hget(keys.job("j1"), "error"))
        assert err["code"] == "dead_lettered" and "deliveries" in err["message"]
        assert client.xlen(keys.dlq) == 1 and client.xpending(keys.stream, keys.group)["pending"] == 0
        assert worker.metrics.dead_letters._value.get() == 1
        assert worker.metrics.jobs.labels(status="failed")._value.get() == 1
    finally:
        worker.cancel_watch.close()


def test_a_job_canceled_on_a_dead_worker_is_not_redelivered(redis_url: str) -> None:
    """A job canceled while it ran on a worker that then died is acked by the worker that reclaims
    its entry: no redelivery, no dead letter (it was redelivered, and dead-lettered at MAX_DELIVERIES,
    although its client had canceled it)."""
    client, settings, keys, q = _read_by_a_dead_worker(redis_url, "j1", "j2")
    assert q.start("j1", "dead-1")[0] == "processing" and q.start("j2", "dead-1")[0] == "processing"
    client.hset(keys.job("j1"), "status", "canceled")  # the API's TERMINATE of a running job
    worker = Worker(settings, client, WorkerMetrics(CollectorRegistry()), consumer="rescuer")
    try:
        time.sleep(0.15)
        worker._recover()
        assert [h.entry.job_id for h in worker.held] == ["j2"]  # the live one is taken over
        assert worker.metrics.redeliveries._value.get() == 1 and worker.metrics.dead_letters._value.get() == 0
        assert client.hget(keys.job("j1"), "status") == b"canceled"
        pending = client.xpending_range(keys.stream, keys.group, "-", "+", 10)
        assert [p["consumer"] for p in pending] == [b"rescuer"] and client.xlen(keys.stream) == 1
    finally:
        worker.cancel_watch.close()


def test_a_gap_between_heartbeats_counts_as_an_outage(redis_url: str) -> None:
    """Owners are judged only once Redis has answered for API_LEASE_S/3 + 1 s; a gap between two good
    heartbeats longer than half a lease (an outage between them, or a call that hung, which raise
    nothing) restarts that wait: a review saw a live API's job canceled after such an outage."""
    settings = ServiceSettings(redis_url=redis_url, key_prefix=f"gap{uuid.uuid4().hex[:6]}", api_lease_s=3,
                               heartbeat_s=1)
    worker = Worker(settings, redis.Redis.from_url(redis_url), WorkerMetrics(CollectorRegistry()), consumer="w")
    try:
        t = time.monotonic()
        worker.redis_ok_since, worker._last_beat_ok = t - 10, t - 1
        assert worker.owner_checks()
        worker.beat_ok(t)  # 1 s after the last: nothing missed
        assert worker.owner_checks()
        worker.beat_ok(t + 1.6)  # 1.6 s > 3 / 2 since the last good beat: maybe an outage
        assert worker.redis_ok_since == t + 1.6 and not worker.owner_checks()
    finally:
        worker.cancel_watch.close()


@pytest.mark.parametrize("strategy", ["rle", "default", "huffman"])
def test_png_strategies_are_lossless(strategy: str) -> None:
    """Every PNG setting decodes to the exact pixels; the strategy changes the bytes, not the image."""
    import io

    import numpy as np
    from PIL import Image

    from service.imaging import PngParams, encode

    rng = np.random.default_rng(0)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[8:30, 10:40] = (200, 30, 30)  # flat shapes and a noisy patch, like the demo's pictures
    rgb[30:, 40:] = rng.integers(0, 256, (18, 24, 3), dtype=np.uint8)
    data = encode(rgb.tobytes(), 64, 48, "png", png=PngParams(1, strategy))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rgb)
    if strategy != "default":
        assert data != encode(rgb.tobytes(), 64, 48, "png", png=PngParams(1, "default"))


def test_finish_returns_the_hash_as_stored(redis_url: str) -> None:
    """What `ldserve serve`'s worker hands the API threads is what HGETALL reads after FINISH,
    admitted by the API's own script; a second FINISH (the job ended) stores and returns nothing."""
    import asyncio
    import os

    import redis.asyncio as aredis

    from service.queue import JobQueue, ensure_group, parse_job

    keys = Keys(f"fin{uuid.uuid4().hex[:6]}")

    async def admit() -> str:
        c = aredis.Redis.from_url(redis_url)
        try:
            await ensure_group(c, keys)
            job_id, _ = await JobQueue(c, keys, max_len=10, job_ttl_s=60).enqueue(spec(2), timeout_s=30,
                                                                                  idempotency_key=None)
            return job_id
        finally:
            await c.aclose()

    job_id = asyncio.run(admit())
    client = redis.Redis.from_url(redis_url)
    q = WorkerQueue(client, keys, job_ttl_s=60)
    [entry] = q.read_new("w1", 1, None)
    assert q.start(job_id, "w1")[0] == "processing"
    fields = {"result": json.dumps({"inference_s": 0.25, "images": []}), "img0": os.urandom(300), "img1": b"\0" * 9}
    stored = q.finish(entry, "succeeded", fields)
    assert stored is not None
    on_redis = client.hgetall(keys.job(job_id))
    assert {k: on_redis[k] for k in stored} == stored
    job = parse_job(job_id, stored)
    assert job == parse_job(job_id, on_redis)
    assert job.status == "succeeded" and job.started_ms and job.completed_ms and len(job.images) == 2
    assert q.finish(entry, "failed", {"error": "{}"}) is None
    assert client.hget(keys.job(job_id), "status") == b"succeeded"


def test_the_stream_entry_carries_the_spec(redis_url: str) -> None:
    """The worker takes a job's spec from its stream entry (no read of the job hash); an entry
    without one (written before entries carried it) falls back to the hash, and a job whose hash
    expired meanwhile is refused by START and acked without running."""
    import asyncio

    import redis.asyncio as aredis

    from service.queue import JobQueue, ensure_group

    keys = Keys(f"ent{uuid.uuid4().hex[:6]}")
    sent = spec(3, h_div_w=0.5)

    async def admit() -> str:
        c = aredis.Redis.from_url(redis_url)
        try:
            await ensure_group(c, keys)
            return (await JobQueue(c, keys, max_len=10, job_ttl_s=60).enqueue(sent, timeout_s=30,
                                                                             idempotency_key=None))[0]
        finally:
            await c.aclose()

    job_id = asyncio.run(admit())
    client = redis.Redis.from_url(redis_url)
    q = WorkerQueue(client, keys, job_ttl_s=60)
    old_id = client.xadd(keys.stream, {"job_id": job_id, "deadline_ms": 0}).decode()  # an entry of the old shape
    new, old = q.read_new("w1", 2, None)
    assert new.job_id == old.job_id == job_id and old.entry_id == old_id and old.spec_json is None
    assert q.spec(new) == q.spec(old) == sent
    client.delete(keys.job(job_id))  # the hash expired
    assert q.spec(new) == sent
    with pytest.raises(KeyError):
        q.spec(old)
    assert q.start(job_id, "w1")[0] == "missing"
    assert q.finish(new, "missing", {}) is None and client.xpending(keys.stream, keys.group)["pending"] == 1


def test_response_files_use_the_head_start_only_for_the_same_images() -> None:
    """Files encoded ahead (from the images the in-process worker handed over) answer only a job that
    stored those very images; any other job's are encoded from the job itself."""
    import asyncio

    import numpy as np
    from PIL import Image

    from service.api.jobflow import ResponseFiles
    from service.imaging import DEFAULT_PNG
    from service.metrics import ApiMetrics
    from service.queue import Job

    sp = spec(1)
    rng = np.random.default_rng(0)
    ahead, stored = ([np.repeat(rng.integers(0, 256, (256, 64, 3), dtype=np.uint8), 4, axis=1).tobytes()]
                     for _ in range(2))

    def png_pixels(data: bytes) -> bytes:
        import io
        return Image.open(io.BytesIO(data)).convert("RGB").tobytes()

    async def run() -> tuple[list[bytes], list[bytes], float]:
        metrics = ApiMetrics(CollectorRegistry())
        same, other = ResponseFiles(sp, "png", DEFAULT_PNG, metrics), ResponseFiles(sp, "png", DEFAULT_PNG, metrics)
        same.start(ahead)
        other.start(ahead)
        a = await same.of(Job("a", "succeeded", sp, 0, images=list(ahead)))  # equal bytes, another object
        b = await other.of(Job("b", "succeeded", sp, 0, images=stored))
        return a, b, metrics.images_encoded_ahead._value.get()

    a, b, counted = asyncio.run(run())
    assert png_pixels(a[0]) == ahead[0] and png_pixels(b[0]) == stored[0] and counted == 1


def test_accept_negotiation_rules() -> None:
    from service.api.accept import negotiate, refuses

    offered = ["application/json", "text/event-stream", "image/png", "image/webp"]
    assert negotiate(None, offered) == negotiate("", offered) == negotiate("*/*", offered) == "application/json"
    assert negotiate("image/png", offered) == "image/png"
    assert negotiate("image/png, application/json", offered) == "application/json"  # equal: the default
    assert negotiate("image/png, */*", offered) == "image/png"  # named beats covered by */*
    assert negotiate("image/*", offered) == "image/png"  # the first offered image
    assert negotiate("image/webp;q=0.9, image/png;q=0.2", offered) == "image/webp"
    assert negotiate("IMAGE/PNG ; Q=0.5", offered) == "image/png"  # case and spaces
    assert negotiate("image/png;q=0, */*", offered) == "application/json"
    assert negotiate("*/*;q=0.1, text/event-stream", offered) == "text/event-stream"
    assert negotiate("image/gif", offered) is None and negotiate("application/json;q=0", offered) is None
    assert negotiate("image/png;q=oops", offered) == "image/png"  # a malformed q counts as 1
    assert negotiate("nonsense", offered) == "application/json"
    assert refuses("application/json;q=0, image/png", "application/json")
    assert refuses("application/*;q=0", "application/json") and not refuses("image/png", "application/json")


def test_dead_workers_are_forgotten_and_not_counted(redis_url: str) -> None:
    """Workers killed outright leave a registry entry (ready) and a group consumer: stale entries and
    idle consumers without pending entries are pruned (a consumer still holding entries stays for
    XAUTOCLAIM), and Retry-After counts only workers whose heartbeat is fresh."""
    import asyncio

    import redis.asyncio as aredis

    from service.queue import JobQueue

    keys = Keys(f"prune{uuid.uuid4().hex[:6]}")
    client = redis.Redis.from_url(redis_url)
    q = WorkerQueue(client, keys, job_ttl_s=60)
    q.ensure_group()
    client.xadd(keys.stream, {"job_id": "j1"})
    q.read_new("holder", 1, None)  # a dead worker that still holds an entry
    client.xadd(keys.stream, {"job_id": "j2"})
    [done] = q.read_new("idle-dead", 1, None)  # a dead worker that holds nothing (its job was acked)
    client.xack(keys.stream, keys.group, done.entry_id)
    q.heartbeat("me", {"ready": True, "s_per_image": 1.0})
    client.hset(keys.workers, "dead", json.dumps({"ready": True, "s_per_image": 1.0, "ts": time.time() - 3600}))

    async def retry_after() -> int:
        c = aredis.Redis.from_url(redis_url)
        try:
            return await JobQueue(c, keys, max_len=10, job_ttl_s=60, worker_stale_s=10).retry_after(20)
        finally:
            await c.aclose()

    assert asyncio.run(retry_after()) == 20  # 20 jobs at 1 s per image for the one live worker, not 2
    time.sleep(0.3)
    assert q.prune("me", stale_after_s=0.2) == (1, 1)
    assert set(client.hkeys(keys.workers)) == {b"me"}
    names = {c["name"] for c in client.xinfo_consumers(keys.stream, keys.group)}
    assert {n.decode() if isinstance(n, bytes) else n for n in names} == {"holder"}


def test_autoclaim_goes_on_where_it_stopped(redis_url: str) -> None:
    """Successive reclaims walk the whole pending list, each entry once (Redis 7 scans at most 10 x
    count pending entries per call, so restarting at 0-0 could starve entries behind live ones)."""
    keys = Keys(f"ac{uuid.uuid4().hex[:6]}")
    client = redis.Redis.from_url(redis_url)
    q = WorkerQueue(client, keys, job_ttl_s=60)
    q.ensure_group()
    for i in range(30):
        client.xadd(keys.stream, {"job_id": f"j{i}"})
    q.read_new("dead", 30, None)
    time.sleep(0.05)
    got = [e.job_id for _ in range(8) for e in q.autoclaim("me", 10, 4)]
    assert sorted(got) == sorted(f"j{i}" for i in range(30))


def test_worker_claims_only_jobs_that_join_its_batch(redis_url: str) -> None:
    """Gathering a batch from a burst of mixed sizes, a worker claims the jobs that join it and stops
    before the first that does not (another key, or more images than the room left), which stays in
    the stream for other workers. It took up to MAX_BATCH_SIZE entries of any key once (and ran them
    key after key while another worker sat idle), then held the first that did not join."""
    import asyncio

    import redis.asyncio as aredis

    from service.queue import JobQueue

    prefix = f"mix{uuid.uuid4().hex[:6]}"
    keys = Keys(prefix)
    specs = [spec(1), spec(1, h_div_w=0.5), spec(1), spec(1)]  # key A, B, A, A

    job_ids: list[str] = []

    async def admit() -> None:
        c = aredis.Redis.from_url(redis_url)
        try:
            q = JobQueue(c, keys, max_len=100, job_ttl_s=60)
            for sp in specs:
                job_ids.append((await q.enqueue(sp, timeout_s=60, idempotency_key=None))[0])
        finally:
            await c.aclose()

    s = ServiceSettings(redis_url=redis_url, key_prefix=prefix, model_preset="tiny-2b", max_batch_size=4)
    w = Worker(s, redis.Redis.from_url(redis_url), WorkerMetrics(CollectorRegistry()), consumer="w1")
    try:
        w.queue.ensure_group()
        asyncio.run(admit())
        w.step()  # idle: reads the first job, then gathers its batch
        assert [h.spec.h_div_w for h in w.held] == [1.0]  # stopped before the first job of another key
        other = WorkerQueue(redis.Redis.from_url(redis_url), keys, job_ttl_s=60).read_new("w2", 4, None)
        assert [e.job_id for e in other] == job_ids[1:]  # it and the two key-A jobs behind it: another worker's
        # same key, but more images than the room left: it is the next batch's, and reading stops there
        w.held.clear()
        job_ids.clear()
        specs[:] = [spec(3), spec(2), spec(1), spec(1)]
        asyncio.run(admit())
        w.step()
        assert [h.spec.n for h in w.held] == [3]
        assert [e.job_id for e in WorkerQueue(redis.Redis.from_url(redis_url), keys,
                                              job_ttl_s=60).read_new("w2", 4, None)] == job_ids[1:]
        # an entry written by an older API (no batch key in it) is claimed, and ends the gathering
        w.held.clear()
        job_ids.clear()
        specs[:] = [spec(1), spec(1, h_div_w=0.5), spec(1)]
        asyncio.run(admit())
        client = redis.Redis.from_url(redis_url)
        last = client.xrevrange(keys.stream, count=2)
        for eid, fields in reversed(last):  # the last two as an older API wrote them
            client.xdel(keys.stream, eid)
            client.xadd(keys.stream, {k: v for k, v in fields.items() if k not in (b"batch_key", b"n")})
        w.step()
        assert [h.spec.h_div_w for h in w.held] == [1.0, 0.5]
    finally:
        w.cancel_watch.close()


def test_kept_fraction_is_labelled_by_place_from_the_end() -> None:
    """A 256 px (7 scales) and a 512 px (10 scales) image of tiny-2b: their last scales share a label
    (by index, scale 6 was the last of one and a middle scale of the other)."""
    from model_loader.schedules import scale_schedule

    registry = CollectorRegistry()
    m = WorkerMetrics(registry)
    for pn, kept_last in (("0.06M", 0.25), ("0.25M", 0.75)):
        n = len(scale_schedule(1.0, pn))
        m.record_sample({"tokens_computed": 1, "tokens_full": 2, "uncond_stop_scale": None, "ideal_speedup": 2.0,
                         "kept_fraction_per_scale": [1.0] * (n - 1) + [kept_last]})

    def sample(scale: str, suffix: str = "_count") -> float | None:
        return registry.get_sample_value(f"ldserve_kept_fraction{suffix}", {"scale": scale})

    assert sample("last") == 2 and sample("last", "_sum") == 1.0
    assert sample("last-6") == 2 and sample("last-9") == 1 and sample("6") is None


def test_canceling_a_job_a_worker_holds_keeps_the_waiting_count(redis_url: str) -> None:
    """Waiting = XLEN - pending. Canceling a queued job acks and deletes its entry: deleted alone, an
    entry a worker had read left XLEN but not the pending list (the waiting count read one job short
    until that worker's START), and if that worker died, XAUTOCLAIM handed the canceled job out
    again (a redelivery; at MAX_DELIVERIES a dead letter). The worker's START of it acks nothing more."""
    import asyncio

    import redis.asyncio as aredis

    from service.queue import JobQueue, ensure_group

    keys = Keys(f"wait{uuid.uuid4().hex[:6]}")
    client = redis.Redis.from_url(redis_url)
    q = WorkerQueue(client, keys, job_ttl_s=60)

    async def scenario() -> tuple[list[str], tuple[int, int], tuple[int, int]]:
        c = aredis.Redis.from_url(redis_url)
        try:
            await ensure_group(c, keys)
            jq = JobQueue(c, keys, max_len=10, job_ttl_s=60)
            ids = [(await jq.enqueue(spec(), timeout_s=30, idempotency_key=None))[0] for _ in range(4)]
            held = await asyncio.to_thread(q.read_new, "w1", 2, None)
            assert [e.job_id for e in held] == ids[:2]
            assert await jq.terminate(ids[0], "canceled") == "queued"  # read by the worker, not started
            after_held = await jq.depth()
            assert await jq.terminate(ids[3], "canceled") == "queued"  # never read
            return ids, after_held, await jq.depth()
        finally:
            await c.aclose()

    ids, after_held, after_unread = asyncio.run(scenario())
    assert after_held == (2, 1)  # jobs 3 and 4 wait; the worker holds 2 (1 was canceled)
    assert after_unread == (1, 1)
    time.sleep(0.05)
    assert [e.job_id for e in q.autoclaim("w2", 10, 10)] == [ids[1]]  # the worker died: only job 2 is taken over
    assert q.start(ids[0], "w1")[0] == "canceled"  # the first worker's START of the canceled job
    assert client.xlen(keys.stream) == 2 and client.xpending(keys.stream, keys.group)["pending"] == 1


def test_api_lease_is_renewed_while_redis_refuses_writes() -> None:
    """At maxmemory (noeviction: the manifests' policy, answered 503 queue_backend_full to new jobs)
    Redis refuses SET but allows PEXPIRE: the lease of a live API process is renewed all along (with
    SET it lapsed after its TTL, and workers canceled its clients' jobs as owner_gone)."""
    import asyncio

    import redis.asyncio as aredis

    from service.embedded_redis import EmbeddedRedis
    from service.queue import ApiLease

    async def scenario(url: str) -> list[bool]:
        c = aredis.Redis.from_url(url)
        keys = Keys("lease")
        lease = ApiLease(c, keys, ttl_s=1.0)
        await lease.start()
        seen = []
        try:
            await c.config_set("maxmemory", "1")
            for _ in range(25):  # 2.5 s: 2.5 leases
                await asyncio.sleep(0.1)
                seen.append(bool(await c.exists(keys.api_lease(lease.instance))))
            refused = False
            try:
                await c.set("probe", "1")
            except aredis.RedisError:
                refused = True
            assert refused, "maxmemory 1 did not refuse writes: the test proves nothing"
        finally:
            await c.config_set("maxmemory", "0")
            await lease.stop()
            assert not await c.exists(keys.api_lease(lease.instance))  # released on a clean stop
            await c.aclose()
        return seen

    with EmbeddedRedis() as r:
        assert all(asyncio.run(scenario(r.url)))
