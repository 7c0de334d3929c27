"""The GPU worker: claim jobs from the Redis stream, batch them by key, run the engine, store, ack.

One worker owns one model (one per GPU); concurrency comes from batching. Loop:
recover (XAUTOCLAIM entries idle past ``claim_idle_ms``: live workers touch theirs every
heartbeat, so idle means dead) -> read new entries (XREADGROUP, blocking only as long as
the max-wait window allows) -> when the oldest key's batch is full or has waited long
enough: drop canceled/expired jobs, run the batch, store results and XACK atomically.
``stop()`` (SIGTERM) stops claiming; held and running jobs finish before ``run`` returns.
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_mod
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from . import __version__
from .batching import Held, batch_images, select_batch, should_dispatch
from .engine_client import BatchAbandoned, BatchOut, EngineClient, ImageOut
from .keys import REDIS_CLIENT_OPTIONS, Keys
from .metrics import WorkerMetrics
from .queue import LocalResults
from .settings import ServiceSettings
from .spec import TERMINAL, JobSpec
from .worker_queue import Entry, WorkerQueue

log = logging.getLogger(__name__)
BACKEND_RETRY_S = 0.5  # first wait after a Redis error, doubling up to BACKEND_RETRY_MAX_S
BACKEND_RETRY_MAX_S = 5.0


class EventSender:
    """Writes a batch's progress events from a thread of its own, in order, so the engine does not
    wait on Redis between scales (a write took 0.63 ms median inside ``ldserve serve``, 6 a demo
    image). ``flush`` before a batch's jobs end: their end entry follows their last progress."""

    def __init__(self, queue: WorkerQueue) -> None:
        self.queue = queue
        self._pending: queue_mod.Queue[list[tuple[str, dict[str, Any]]] | None] = queue_mod.Queue()
        self._thread = threading.Thread(target=self._run, name="ldserve-events", daemon=True)
        self._thread.start()

    def put(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        self._pending.put(events)

    def flush(self) -> None:
        self._pending.join()

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            events = self._pending.get()
            try:
                if events is None:
                    return
                self.queue.add_events(events)
            except redis.RedisError as e:  # progress is a courtesy: a Redis error must not fail the batch
                log.warning("could not write progress events: %s", e)
            finally:
                self._pending.task_done()


class CancelWatch:
    """Which jobs of the running batch the API ended meanwhile (cancel, client gone, deadline): its
    TERMINATE script publishes their ids on the events channel, heard here by a thread of its own,
    so the engine can ask between scales without a Redis call. A missed message (Redis restarting)
    only means the batch runs to its end, as before."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._running: set[str] = set()
        self._ended: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ldserve-cancel-watch", daemon=True)
        self._thread.start()

    def begin(self, job_ids: list[str]) -> None:
        with self._lock:
            self._running, self._ended = set(job_ids), set()

    def restrict(self, job_ids: list[str]) -> None:
        """The jobs that did start (keeping what was heard for them already)."""
        with self._lock:
            self._running = set(job_ids)
            self._ended &= self._running

    def ended_of(self, batch: list[Held]) -> Callable[[], set[int]]:
        """For the engine: which jobs of ``batch`` (indices) ended so far."""
        ids = [h.entry.job_id for h in batch]

        def ended() -> set[int]:
            with self._lock:
                return {i for i, job_id in enumerate(ids) if job_id in self._ended}

        return ended

    def end(self) -> None:
        self.begin([])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                try:
                    while not self._stop.is_set():
                        msg = pubsub.get_message(timeout=0.5)
                        if msg is not None:
                            job_id = msg["data"].decode()
                            with self._lock:
                                if job_id in self._running:
                                    self._ended.add(job_id)
                finally:
                    pubsub.close()
            except redis.RedisError as e:
                log.warning("cancel watch lost its subscription (%s); resubscribing", e)
                self._stop.wait(1.0)


PRUNE_EVERY_S, PRUNE_AFTER_MIN_S = 60.0, 60.0
"""Each worker forgets dead workers (``WorkerQueue.prune``) this often, once silent this long (or six
heartbeat staleness periods, if longer)."""


class Worker:
    def __init__(self, settings: ServiceSettings, client: redis.Redis, metrics: WorkerMetrics, *,
                 engine_factory: Callable[[ServiceSettings], EngineClient] = EngineClient,
                 consumer: str | None = None, local_results: LocalResults | None = None) -> None:
        """``local_results``: ``ldserve serve`` hands each stored result to the API threads too."""
        self.settings = settings
        self.local_results = local_results
        self.queue = WorkerQueue(client, Keys(settings.key_prefix), job_ttl_s=settings.job_ttl_s)
        self.metrics = metrics
        self.engine_factory = engine_factory
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.engine: EngineClient | None = None
        self.held: list[Held] = []
        self.running: list[Held] = []
        """The batch on the device (its jobs' owners are checked every heartbeat)."""
        self.owned: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb_stop = threading.Event()
        self.ready = False
        self.events = EventSender(self.queue)
        self.cancel_watch = CancelWatch(client, self.queue.keys.events)
        self.s_per_image = 1.0
        self._last_recover = 0.0
        self.progress_at = time.monotonic()
        """When the loop last moved (a step began, a scale of a batch ended): ``alive``."""
        self.backend_ok = True
        """False from a failed Redis call of the loop until its next step succeeds: not ``serving``."""
        self.redis_ok_since: float | None = time.monotonic()
        self._last_beat_ok = time.monotonic()
        """Since when this worker's Redis calls have succeeded (None after a failure): ``owner_checks``."""
        self.winding_down = False
        """Set when its process is stopping (``ldserve serve``'s API draining): no more calibrations."""

    @property
    def draining(self) -> bool:
        return self._stop.is_set()

    @property
    def serving(self) -> bool:
        """Warm, its queue reachable, not draining: what its heartbeat and ``/health/ready`` say."""
        return self.ready and self.backend_ok and not self.draining

    def alive(self) -> bool:
        """False once a ready worker's loop has not moved for ``worker_stall_s`` (hung: a stuck
        device call, a deadlock); loading the model does not count (startup probes cover it)."""
        return not self.ready or time.monotonic() - self.progress_at < self.settings.worker_stall_s

    def stop(self) -> None:
        """Stop claiming; the current batch and held jobs still finish."""
        log.info("worker %s draining", self.consumer)
        self._stop.set()

    # ---- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        self.queue.ensure_group()
        hb = threading.Thread(target=self._heartbeat_loop, name="ldserve-heartbeat", daemon=True)
        hb.start()
        try:
            self._load()
            backoff = BACKEND_RETRY_S
            while not self._stop.is_set():
                try:
                    self.step()
                    backoff = BACKEND_RETRY_S
                    self.backend_ok = True
                except redis.RedisError as e:  # Redis restarting, failing over, or out of memory
                    self.backend_ok = False
                    self.redis_ok_since = None
                    if self._recreate_group(e):
                        continue
                    self._after_backend_error(e, backoff)
                    backoff = min(BACKEND_RETRY_MAX_S, 2 * backoff)
            while self.held:
                self.run_batch()
        finally:
            self.events.close()
            self.cancel_watch.close()
            self._hb_stop.set()
            hb.join(timeout=5)
            try:
                self.queue.remove_worker(self.consumer)
            except redis.RedisError as e:  # Redis gone: its entry goes stale and is pruned by others
                log.warning("could not remove worker %s from the registry: %s", self.consumer, e)
            log.info("worker %s stopped", self.consumer)

    def _recreate_group(self, e: redis.RedisError) -> bool:
        """NOGROUP: the stream and its consumer group are gone (Redis restarted without persistence,
        was flushed, or failed over to an empty replica): create them again and go on (the jobs the
        old Redis held are gone with it). Before, every read failed with NOGROUP for good."""
        if not (isinstance(e, redis.ResponseError) and "NOGROUP" in str(e)):
            return False
        try:
            self.queue.ensure_group()
        except redis.RedisError:
            return False
        log.warning("the job stream's consumer group was gone (Redis restarted empty?): created it again")
        return True

    def _after_backend_error(self, e: redis.RedisError, wait_s: float) -> None:
        """A Redis call failed mid-step: jobs this worker holds but no longer tracks in ``held`` (a
        batch being started or stored) stop being touched, so after ``claim_idle_ms`` XAUTOCLAIM
        hands them out again (their delivery count says so); the worker waits and goes on."""
        held = {h.entry.entry_id for h in self.held}
        with self._lock:
            lost = [i for i in self.owned if i not in held]
            for i in lost:
                del self.owned[i]
        log.warning("queue backend error (%s): %d job(s) in flight left to be reclaimed; retrying in %.1f s",
                    e, len(lost), wait_s)
        self._stop.wait(wait_s)

    def _load(self) -> None:
        t0 = time.perf_counter()
        self.engine = self.engine_factory(self.settings)
        warm = self.engine.warmup()
        self.metrics.model_info.labels(model=self.engine.model_name, device=self.settings.device,
                                       dtype=self.engine.dtype, pruning_default=self.settings.pruning_default,
                                       version=__version__).set(1)
        self.ready = True
        self._beat()
        log.info("worker %s ready: %s on %s (load+warm-up %.1f s, warm-up %.1f s)", self.consumer,
                 self.engine.model_name, self.settings.device, time.perf_counter() - t0, warm)

    def _heartbeat_loop(self) -> None:
        pruned_at = 0.0
        while not self._hb_stop.wait(self.settings.heartbeat_s):
            try:
                self._beat()
                self.beat_ok(time.monotonic())
                self._stop_orphans()
                if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    gone = self.queue.prune(self.consumer, max(PRUNE_AFTER_MIN_S, 6 * self.settings.heartbeat_stale_s))
                    if any(gone):
                        log.info("forgot %d dead worker(s) and %d idle consumer(s)", *gone)
            except redis.RedisError as e:
                self.redis_ok_since = None
                log.warning("heartbeat failed: %s", e)

    def _beat(self) -> None:
        with self._lock:
            ids = list(self.owned)
        self.queue.touch(self.consumer, ids)
        self.queue.heartbeat(self.consumer, {"ready": self.serving,
                                             "model": self.settings.model_preset, "pid": os.getpid(),
                                             "s_per_image": self.s_per_image, "held": len(ids)})

    def _stop_orphans(self) -> None:
        """Jobs of the running batch whose API process is gone (``ApiLease``: their clients went with
        it) end canceled; CancelWatch hears it, and the engine drops their samples at the next scale."""
        if not self.owner_checks():
            return
        with self._lock:
            running = list(self.running)
        gone = self.queue.gone_owners({o for o in (h.entry.owner for h in running) if self._judged(o)})
        for h in running:
            if h.entry.owner in gone and self.queue.cancel_orphan(h.entry.job_id):
                log.warning("job %s canceled: the API process %s waiting for it is gone", h.entry.job_id,
                            h.entry.owner)
                self.metrics.jobs.labels(status="canceled").inc()

    def beat_ok(self, now: float) -> None:
        """A heartbeat succeeded at ``now``. Its calls are the only ones this worker makes during a
        batch, so a gap since the last good one longer than half an API lease (a Redis outage between
        two beats, or a call that hung and then went through) counts as an outage: owners are not
        judged until live APIs have had time to renew (a review canceled a live API's job that way)."""
        if self.redis_ok_since is None or now - self._last_beat_ok > self.settings.api_lease_s / 2:
            self.redis_ok_since = now
        self._last_beat_ok = now

    def owner_checks(self) -> bool:
        """Whether to judge jobs' owners now: once Redis has answered this worker for longer than an
        API's renewal period plus a second (after a Redis outage, restart or maxmemory refusal, live
        API processes renew their leases first; they retry every 0.5 s). Assumes the APIs' API_LEASE_S
        is this worker's."""
        since = self.redis_ok_since
        return since is not None and time.monotonic() - since > self.settings.api_lease_s / 3 + 1.0

    def _judged(self, owner: str | None) -> bool:
        """An owner this worker may find gone: not none, and not its own process's API (ldserve serve)."""
        return owner is not None and (self.local_results is None or owner != self.local_results.owner)

    # ---- claiming --------------------------------------------------------------------------
    def step(self) -> None:
        s = self.settings
        self.progress_at = time.monotonic()
        self._recover()
        now = time.monotonic()
        if should_dispatch(self.held, max_images=s.max_batch_size, max_wait_s=s.max_batch_wait_ms / 1000, now=now):
            self.run_batch()
            return
        if self.held:
            # Wait out the rest of the batching window here, then read without blocking: a Redis
            # BLOCK timeout only fires on the server's cron tick (1/hz, 100 ms by default), so
            # BLOCK 4 measured 18-59 ms and every single request paid it.
            waited = now - min(h.entry.claimed_at for h in self.held)
            time.sleep(max(0.0, s.max_batch_wait_ms / 1000 - waited))
            self._read_more()
            return
        for e in self.queue.read_new(self.consumer, 1, s.block_ms):  # Redis errors: run() backs off
            self._admit(e)
        if self.held:
            self._read_more()
        elif self.engine is not None and self.engine.pending and not (self.draining or self.winding_down):
            # idle: time a new shape unpruned now (not while stopping: device work nobody waits for)
            took = self.engine.calibrate_pending()
            self.metrics.calibration.inc(took)

    def _read_more(self) -> None:
        """Fill the batch being gathered with the next unread entries while their jobs join it (same
        batch key, images within the room left), claimed one at a time by a script that looks at an
        entry before claiming it (``READ_IF_JOINS``): the first that does not join stays in the
        stream for idle workers. The worker read up to MAX_BATCH_SIZE entries of any key at once
        before, then (2026-11-27) one at a time, stopping after the first that did not join, which
        it then held while another worker could sit idle."""
        limit = self.settings.max_batch_size
        while True:
            batch = select_batch(self.held, limit)[0]
            room = limit - batch_images(batch)
            if room <= 0:
                return
            got = self.queue.read_if_joins(self.consumer, batch[0].spec.batch_tag, room)
            if got is None:
                return
            self._admit(got)
            if not any(h.entry is got for h in select_batch(self.held, limit)[0]):
                return  # (an entry of an older API, without its batch key) the next batch's

    def _recover(self) -> None:
        now = time.monotonic()
        if now - self._last_recover < max(0.1, self.settings.claim_idle_ms / 4000):
            return
        self._last_recover = now
        for e in self.queue.autoclaim(self.consumer, self.settings.claim_idle_ms, self.settings.max_batch_size):
            ended = self.queue.status(e.job_id)
            if ended in TERMINAL:  # canceled or expired while its worker was gone: nothing to redeliver
                self.queue.finish(e, ended, {})
                continue
            if e.deliveries > self.settings.max_deliveries:
                reason = f"dead-lettered after {e.deliveries - 1} deliveries (worker lost each time)"
                log.error("job %s %s", e.job_id, reason)
                self.metrics.dead_letters.inc()
                if self.queue.dead_letter(e, reason):  # (a job canceled meanwhile was counted by the API)
                    self.metrics.jobs.labels(status="failed").inc()
                continue
            log.warning("reclaimed job %s (delivery %d)", e.job_id, e.deliveries)
            self.metrics.redeliveries.inc()
            self._admit(e)

    def _admit(self, e: Entry) -> None:
        try:
            spec = self.queue.spec(e)
        except KeyError:  # job hash expired: nothing to run, just ack
            self.queue.finish(e, "expired", {})
            return
        with self._lock:
            self.owned[e.entry_id] = e
        self.held.append(Held(e, spec))

    def _release(self, e: Entry) -> None:
        with self._lock:
            self.owned.pop(e.entry_id, None)

    # ---- running ---------------------------------------------------------------------------
    def run_batch(self) -> None:
        batch, self.held = select_batch(self.held, self.settings.max_batch_size)
        self.cancel_watch.begin([h.entry.job_id for h in batch])  # before START: no cancel goes unheard
        live = [h for h in batch if self._start(h)]
        if not live:
            self.cancel_watch.end()
            return
        self.cancel_watch.restrict([h.entry.job_id for h in live])
        images = batch_images(live)
        self.metrics.in_flight.set(images)
        with self._lock:
            self.running = live

        def events(rows: list[tuple[int, dict[str, Any]]]) -> None:  # (job index in the batch, fields)
            self.events.put([(live[j].entry.job_id, fields) for j, fields in rows])

        try:
            assert self.engine is not None
            try:
                out = self.engine.generate([h.spec for h in live], events, ended=self._scale_done(live))
            finally:  # before any job of the batch ends: its end entry follows its last progress
                with self._lock:
                    self.running = []
                self.metrics.in_flight.set(0)
                self.events.flush()
                self.cancel_watch.end()
        except BatchAbandoned as stop:  # every job was canceled meanwhile: the GPU stops for nobody
            log.info("batch of %d job(s) %s: every job in it was canceled", len(live), stop)
            self.metrics.batches_abandoned.inc()
            self._ack_canceled(live)
            return
        except Exception as exc:  # a failed batch fails its jobs; it is not retried
            log.exception("batch of %d job(s) failed", len(live))
            for h in live:
                stored = self.queue.fail(h.entry, "failed", "inference_error", f"inference failed: {exc}")
                self._end(h, "failed", stored)
            return
        if out.stopped:  # canceled mid-batch: their samples left it, nothing to store; ack them
            stopped = [live[j] for j in out.stopped]
            log.info("job(s) %s left their batch when canceled", " ".join(h.entry.job_id for h in stopped))
            self.metrics.jobs_stopped.inc(len(stopped))
            self._ack_canceled(stopped)
            keep = [j for j in range(len(live)) if j not in out.stopped]
            live, out = [live[j] for j in keep], replace(out, images=[out.images[j] for j in keep])
        self._store(live, out)
        self._observe_batch(live, out, images)

    def _scale_done(self, live: list[Held]) -> Callable[[], set[int]]:
        """The engine's question after every scale (which jobs were canceled), which also marks the
        loop as moving."""
        ended = self.cancel_watch.ended_of(live)

        def asked() -> set[int]:
            self.progress_at = time.monotonic()
            return ended()

        return asked

    def _ack_canceled(self, held: list[Held]) -> None:
        """Jobs canceled while they ran: FINISH stores nothing (they have ended) and acks them."""
        for h in held:
            self.queue.finish(h.entry, "canceled", {})
            self._release(h.entry)

    def _start(self, h: Held) -> bool:
        """Mark the job processing; drop it (ack) if it was canceled, expired or is past its deadline."""
        owner = h.entry.owner if self._judged(h.entry.owner) and self.owner_checks() else None
        status, now_ms, deadline = self.queue.start(h.entry.job_id, self.consumer, owner)
        if status == "processing":
            h.entry.started_ms = now_ms
            self.metrics.queue_wait.observe(max(0.0, (now_ms - h.entry.created_ms) / 1000))
            return True
        if status == "past_deadline":
            msg = "the job's deadline passed before it reached the GPU"
            self._end(h, "expired", self.queue.fail(h.entry, "expired", "deadline_exceeded", msg))
        else:
            if status == "owner_gone":  # START canceled it (nobody is left to read it): counted here
                log.warning("the API process %s waiting for job %s is gone", h.entry.owner, h.entry.job_id)
                self.metrics.jobs.labels(status="canceled").inc()
            log.info("dropping job %s (%s) before the GPU", h.entry.job_id, status)
            self.queue.finish(h.entry, status, {})
            self._release(h.entry)
        return False

    def _end(self, h: Held, status: str, stored: bool) -> None:
        self._release(h.entry)
        if stored:
            self.metrics.jobs.labels(status=status).inc()

    def _store(self, live: list[Held], out: BatchOut) -> None:
        """FINISH each job as succeeded. With ``local_results`` (``ldserve serve``), every job's images
        go to the API threads first (their responses start encoding while the FINISHes write to
        Redis), then each stored hash as its FINISH returns."""
        local = self.local_results
        if local is not None:
            for h, imgs in zip(live, out.images, strict=True):
                local.finishing(h.entry.job_id, [img.rgb for img in imgs])
        for i, (h, imgs) in enumerate(zip(live, out.images, strict=True)):
            try:
                stored = self.queue.finish(h.entry, "succeeded", self._result_fields(h, imgs, live, out))
            except BaseException:
                if local is not None:  # (Redis) its waiters, and those of the jobs after it, read Redis
                    for later in live[i:]:
                        local.put(later.entry.job_id, None)
                raise
            if local is not None:
                local.put(h.entry.job_id, stored)
            self._end(h, "succeeded", stored is not None)
            if stored is not None:
                self.metrics.job_duration.observe(
                    max(0.0, (int(stored[b"completed_ms"]) - int(stored[b"created_ms"])) / 1000))
                for img in imgs:
                    self.metrics.record_sample(img.stats, pruned=h.spec.pruning is not None, guided=h.spec.cfg != 1.0)

    def _result_fields(self, h: Held, imgs: list[ImageOut], live: list[Held], out: BatchOut) -> dict[str, Any]:
        result = result_doc(h.spec, imgs[0].width, imgs[0].height,
                            queue_wait_s=(h.entry.started_ms - h.entry.created_ms) / 1000,
                            inference_s=out.seconds, batch_images=batch_images(live),
                            per_image=[{"stats": i.stats, "prompt_truncated": i.prompt_truncated,
                                        "text_tokens": i.text_tokens} for i in imgs],
                            worker_s=time.monotonic() - h.entry.claimed_at)
        fields: dict[str, Any] = {"result": json.dumps(result)}
        fields.update({f"img{k}": img.rgb for k, img in enumerate(imgs)})
        return fields

    def _observe_batch(self, live: list[Held], out: BatchOut, images: int) -> None:
        """``images``: the batch's images when it started (jobs canceled mid-batch had their share
        of its time and size)."""
        self.metrics.inference.observe(out.seconds)
        self.metrics.batch_size.observe(images)
        self.s_per_image = 0.8 * self.s_per_image + 0.2 * out.seconds / images
        assert self.engine is not None
        self.metrics.gpu_memory.set(self.engine.gpu_memory_bytes())
        realized = (self.engine.realized_speedup([h.spec for h in live], out.seconds)
                    if out.pruned and not out.stopped else None)
        if realized is not None:
            self.metrics.realized_speedup.observe(realized)
        flat = [img for imgs in out.images for img in imgs]
        computed = sum(int(i.stats["tokens_computed"]) for i in flat)
        full = sum(int(i.stats["tokens_full"]) for i in flat)
        job_ids = [h.entry.job_id for h in live]  # the jobs it stored (not those canceled mid-batch)
        stored = len(flat)
        log.info("batch of %d job(s), %d image(s) at %dx%d: %.3f s, tokens %d of %d%s; jobs %s", len(live), stored,
                 flat[0].width, flat[0].height, out.seconds, computed, full,
                 f", realized speedup {realized:.2f}x" if realized is not None else "", " ".join(job_ids),
                 extra={"fields": {"job_ids": job_ids, "images": stored, "started_images": images,
                                   "width": flat[0].width,
                                   "height": flat[0].height, "inference_s": round(out.seconds, 4),
                                   "tokens_computed": computed, "tokens_full": full,
                                   "realized_speedup": None if realized is None else round(realized, 3)}})


def result_doc(spec: JobSpec, width: int, height: int, *, queue_wait_s: float, inference_s: float,
               batch_images: int, per_image: list[dict[str, Any]], worker_s: float | None = None) -> dict[str, Any]:
    """``worker_s``: from the worker taking the job off the stream to storing its result (includes
    any wait for a batch and the inference), for the API's Server-Timing header."""
    return {"width": width, "height": height, "queue_wait_s": round(queue_wait_s, 4),
            "inference_s": round(inference_s, 4), "batch_images": batch_images,
            "worker_s": None if worker_s is None else round(worker_s, 5),
            "images": [{"seed": seed, **p} for seed, p in zip(spec.seeds, per_image, strict=True)]}


def worker_client(settings: ServiceSettings) -> redis.Redis:
    assert settings.redis_url is not None
    return redis.Redis.from_url(settings.redis_url, **REDIS_CLIENT_OPTIONS)
