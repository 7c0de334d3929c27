"""API side of the job queue: admission (bounded, idempotent), job reads, cancel, and waiting.

Redis layout (see keys.py): stream ``{p}:jobs`` with consumer group ``workers``; job hash
``{p}:job:{id}`` (status, timestamps, spec, result, raw images, and the encoded files once an
async read made them) with a TTL; ``{p}:idem:{sha}``
for Idempotency-Key; completion events on the ``{p}:events`` pub/sub channel (a wake-up hint
only: the job hash is the truth); per job a stream ``{p}:jobevents:{id}`` of progress, partial
images and, last, its end (api/events.py), with the job's TTL. Acked entries are XDELed, so XLEN =
waiting + pending.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import RedisError, ResponseError

from .keys import DROP_IMAGES, ENQUEUE, STORE_FILES, TERMINATE, Keys
from .spec import TERMINAL, JobSpec

log = logging.getLogger(__name__)
IDEM_TTL_S = 24 * 3600


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int) -> None:
        super().__init__(f"queue is full ({depth} jobs)")
        self.depth = depth
        self.retry_after_s = retry_after_s


class IdempotencyMismatch(Exception):
    pass


@dataclass
class Job:
    id: str
    status: str
    spec: JobSpec
    created_ms: int
    started_ms: int | None = None
    completed_ms: int | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    images: list[bytes] = field(default_factory=list)
    files: list[bytes] = field(default_factory=list)
    """The images encoded in the spec's output format, once stored by ``JobQueue.store_files``."""
    images_dropped: bool = False
    """The synchronous response that ran this job returned its images, which were then dropped."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _s(v: bytes | None) -> str | None:
    return v.decode() if v is not None else None


def _i(v: bytes | None) -> int | None:
    return int(v) if v not in (None, b"", b"0") else None


def parse_job(job_id: str, h: dict[bytes, bytes]) -> Job:
    spec = JobSpec.model_validate_json(h[b"spec"])
    err = h.get(b"error")
    res = h.get(b"result")
    images = [h[f"img{i}".encode()] for i in range(spec.n) if f"img{i}".encode() in h]
    files = [h[f"file{i}".encode()] for i in range(len(images)) if f"file{i}".encode() in h]
    return Job(id=job_id, status=h[b"status"].decode(), spec=spec, created_ms=int(h[b"created_ms"]),
               started_ms=_i(h.get(b"started_ms")), completed_ms=_i(h.get(b"completed_ms")),
               error=json.loads(err) if err else None, result=json.loads(res) if res else None, images=images,
               files=files if len(files) == len(images) else [], images_dropped=b"images_dropped" in h)


async def ensure_group(client: aredis.Redis, keys: Keys) -> None:
    try:
        await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class JobQueue:
    """Async queue client used by the API process."""

    def __init__(self, client: aredis.Redis, keys: Keys, *, max_len: int, job_ttl_s: int,
                 worker_stale_s: float = 10.0, lease: ApiLease | None = None) -> None:
        """``worker_stale_s``: a worker whose heartbeat is older counts as gone (``retry_after``).
        ``lease``: this API process's, which the jobs its clients wait on name as their owner."""
        self.client = client
        self.lease = lease
        self.worker_stale_s = worker_stale_s
        self.keys = keys
        self.max_len = max_len
        self.job_ttl_s = job_ttl_s
        self._enqueue = client.register_script(ENQUEUE)
        self._terminate = client.register_script(TERMINATE)
        self._store_files = client.register_script(STORE_FILES)
        self._drop_images = client.register_script(DROP_IMAGES)
        self._url_key: bytes | None = None

    async def enqueue(self, spec: JobSpec, *, timeout_s: float | None, idempotency_key: str | None,
                      drawn_seeds: bool = False, owned: bool = False) -> tuple[str, bool]:
        """Returns (job_id, created). Raises QueueFull or IdempotencyMismatch. ``drawn_seeds``: the
        spec's seeds were drawn by the server (``JobSpec.payload_hash``). ``owned``: only the client
        of this request, connected to this process, reads the job (synchronous or streamed, no
        Idempotency-Key): workers drop it if this process dies first (``ApiLease``)."""
        job_id = uuid.uuid4().hex
        phash = spec.payload_hash(drawn_seeds=drawn_seeds)
        idem = self.keys.idem(idempotency_key) if idempotency_key else self.keys.job("none")
        timeout_ms = int(timeout_s * 1000) if timeout_s else 0
        owner = self.lease.instance if owned and self.lease is not None else ""
        lease_key, lease_ms = (self.keys.api_lease(owner), self.lease.ttl_ms) if owner else (self.keys.job(job_id), 0)
        args = [self.max_len, max(1000, 10 * self.max_len), job_id, spec.model_dump_json(), timeout_ms,
                self.job_ttl_s, phash, IDEM_TTL_S, "1" if idempotency_key else "0", self.keys.job(""),
                owner, lease_ms, spec.batch_tag, spec.n]
        kind, a, b = await self._enqueue(keys=[self.keys.stream, self.keys.job(job_id), idem, lease_key], args=args)
        kind = kind.decode()
        if kind == "full":
            raise QueueFull(int(a), await self.retry_after(int(a)))
        if kind == "dup":
            if b.decode() != phash:
                raise IdempotencyMismatch("Idempotency-Key was used with a different request body")
            return a.decode(), False
        return job_id, True

    async def retry_after(self, depth: int) -> int:
        workers = await self.workers()
        ready = [w for w in workers if w.get("ready") and w["age_s"] < self.worker_stale_s]
        per_image = max([w.get("s_per_image", 1.0) for w in ready] or [1.0])
        return max(1, math.ceil(depth * per_image / max(1, len(ready))))

    async def get(self, job_id: str) -> Job | None:
        h = await self.client.hgetall(self.keys.job(job_id))
        return parse_job(job_id, h) if h else None

    async def read_events(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """A job's events after stream id ``after`` ("0" for all), waiting up to ``block_ms`` for one."""
        got = await self.client.xread({self.keys.job_events(job_id): after}, count=64, block=block_ms)
        return [(eid.decode(), fields) for _, entries in got for eid, fields in entries]

    async def get_file(self, job_id: str, index: int) -> tuple[JobSpec, bytes | None] | None:
        """A job's spec and its encoded image ``index`` (None until stored), without reading the
        raw images; None if the job no longer exists."""
        spec, data = await self.client.hmget(self.keys.job(job_id), ["spec", f"file{index}"])
        return None if spec is None else (JobSpec.model_validate_json(spec), data)

    async def url_signing_key(self) -> bytes:
        """The key of file links shared by every API process: created once in Redis, then cached."""
        if self._url_key is None:
            fresh = secrets.token_hex(32).encode()
            await self.client.set(self.keys.url_signing_key, fresh, nx=True)
            self._url_key = await self.client.get(self.keys.url_signing_key) or fresh
        return self._url_key

    async def store_files(self, job_id: str, files: list[bytes]) -> int:
        """Keep a finished job's encoded images beside its raw ones, so later reads of the job
        neither encode again nor count its images again: 1 stored, 0 another read stored them first,
        -1 the job expired."""
        return int(await self._store_files(keys=[self.keys.job(job_id)], args=[len(files), *files]))

    async def drop_images(self, job_id: str, n: int, events: bool = False) -> None:
        """Forget a delivered job's images; its record (status, metrics) stays until its TTL.
        ``events``: its event stream (partial images) too."""
        await self._drop_images(keys=[self.keys.job(job_id)], args=[n])
        if events:
            await self.client.delete(self.keys.job_events(job_id))

    async def terminate(self, job_id: str, status: str, error: dict[str, Any] | None = None) -> str | None:
        """Move a live job to canceled/expired; returns the previous status (None if unknown)."""
        prev = await self._terminate(keys=[self.keys.job(job_id), self.keys.stream, self.keys.job_events(job_id)],
                                     args=[status, json.dumps(error) if error else "", self.keys.events, job_id,
                                           self.keys.group])
        return _s(prev)

    async def depth(self) -> tuple[int, int]:
        """(waiting, pending): entries never delivered, and delivered but not acked."""
        total = await self.client.xlen(self.keys.stream)
        try:
            info = await self.client.xpending(self.keys.stream, self.keys.group)
            pending = int(info["pending"])
        except ResponseError:
            pending = 0
        return max(0, total - pending), pending

    async def workers(self) -> list[dict[str, Any]]:
        raw = await self.client.hgetall(self.keys.workers)
        now = time.time()
        out = []
        for name, val in raw.items():
            w = json.loads(val)
            w["name"] = name.decode()
            w["age_s"] = max(0.0, now - w["ts"])
            out.append(w)
        return out


LEASE_RETRY_S = 0.5
"""An API process whose lease renewal failed retries this often until it succeeds."""


class ApiLease:
    """This API process's key in Redis (``Keys.api_lease``), set for ``ttl_s`` and renewed every
    third of it while the process runs, deleted when it stops. A job that only this process's
    client will read (``JobQueue.enqueue(owned=True)``) names it as owner; once the key is gone
    (the process was SIGKILLed, OOM-killed, lost with its node: its clients' connections with it),
    workers drop the job before the GPU (START) or stop it between scales (their heartbeat looks),
    instead of running it for nobody. Keeping a live process's jobs alive matters more than
    catching a dead one fast, so: ENQUEUE sets the key too (the process is alive as it enqueues:
    a Redis that came back empty does not cancel the jobs it admits before the next renewal);
    renewal is a PEXPIRE (Redis allows it at maxmemory, where SET is refused) and a failed one
    is retried every ``LEASE_RETRY_S``; a worker judges owners only once its own Redis has
    answered for longer than a renewal period (``Worker.owner_checks``: after a Redis outage or
    restart, live processes renew first), and ``ldserve serve``'s worker never judges its own
    process. Left: an API process cut off from a Redis its workers still reach for longer than
    ``ttl_s`` loses the jobs it admitted."""

    def __init__(self, client: aredis.Redis, keys: Keys, ttl_s: float) -> None:
        self.client, self.keys, self.ttl_s = client, keys, ttl_s
        self.instance = uuid.uuid4().hex[:16]
        self._task: asyncio.Task[None] | None = None

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    async def renew(self) -> None:
        key = self.keys.api_lease(self.instance)
        if not await self.client.pexpire(key, self.ttl_ms):  # PEXPIRE is allowed at maxmemory, SET is not
            await self.client.set(key, "1", px=self.ttl_ms)

    async def _loop(self) -> None:
        wait = self.ttl_s / 3
        while True:
            await asyncio.sleep(wait)
            try:
                await self.renew()
                wait = self.ttl_s / 3
            except RedisError as e:  # Redis restarting or refusing: retry soon, not a period later
                log.warning("could not renew the API lease: %s", e)
                wait = min(LEASE_RETRY_S, self.ttl_s / 3)

    async def start(self) -> None:
        try:
            await self.renew()
        except RedisError as e:  # start anyway (readiness reports Redis down); the loop retries
            log.warning("could not take the API lease yet: %s", e)
        self._task = asyncio.create_task(self._loop(), name="ldserve-api-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.client.delete(self.keys.api_lease(self.instance))
        except RedisError as e:
            log.warning("could not release the API lease: %s", e)


LOCAL_HANDOVER_WAIT_S = 0.05
"""How long a waiter woken by pub/sub holds off its Redis read for a job whose FINISH the in-process
worker has in flight (its hand-over follows within about a millisecond)."""


Deliver = Callable[[str, dict[bytes, bytes] | None], None]
"""(job id, its stored hash or None): a finished job, on the API's loop."""
Ahead = Callable[[str, list[bytes]], None]
"""(job id, its images): a job whose FINISH is about to run, on the API's loop."""


class LocalResults:
    """``ldserve serve`` only (API and worker threads in one process): the worker hands each job it
    stored to this process's waiters as the hash it just wrote (``WorkerQueue.finish``), so a
    synchronous response does not read the job's images back from Redis (a 256 px image: 196 KB).
    The hash is what HGETALL would have read at that moment; waiters in other API processes still
    go through pub/sub and Redis. FINISH publishes the job's completion from inside Redis, which
    can reach the API before FINISH's reply reaches the worker thread: ``finishing`` marks the
    jobs in that window, so a waiter woken early waits for the hand-over instead of reading.
    ``finishing`` also hands the job's images over ahead of its FINISH, so a response can encode
    them meanwhile (its files are used only if the stored job holds the same images)."""

    def __init__(self) -> None:
        self.owner: str | None = None
        """The in-process API's lease instance (its jobs' owner; alive as long as this process)."""
        self._target: tuple[asyncio.AbstractEventLoop, Deliver, Ahead] | None = None
        self._finishing: set[str] = set()
        self._lock = threading.Lock()

    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, ahead: Ahead) -> None:
        with self._lock:
            self._target = (loop, deliver, ahead)

    def detach(self) -> None:
        with self._lock:
            self._target = None

    def finishing(self, job_id: str, images: list[bytes]) -> None:
        """From the worker thread, before its FINISH call for the job (which stores ``images``)."""
        with self._lock:
            self._finishing.add(job_id)
            target = self._target
        if target is not None:
            try:
                target[0].call_soon_threadsafe(target[2], job_id, images)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    def is_finishing(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._finishing

    def put(self, job_id: str, stored: dict[bytes, bytes] | None) -> None:
        """From the worker thread, after FINISH (``stored`` None: it stored nothing, or failed):
        ``deliver`` runs on the API's loop (a no-op if nobody waits). The job stops counting as
        finishing there, on the loop, so a waiter sees either the mark or the delivered hash."""
        with self._lock:
            target = self._target
            if target is None:
                self._finishing.discard(job_id)
                return
        try:
            target[0].call_soon_threadsafe(self._handover, target[1], job_id, stored)
        except RuntimeError:  # the loop closed meanwhile (shutdown): waiters are gone too
            with self._lock:
                self._finishing.discard(job_id)

    def _handover(self, deliver: Deliver, job_id: str, stored: dict[bytes, bytes] | None) -> None:
        with self._lock:
            self._finishing.discard(job_id)
        deliver(job_id, stored)


WAIT_RETRY_S, WAIT_RETRY_MAX_S = 0.25, 2.0
"""A synchronous waiter whose read of its job fails retries after this, doubling up to the max."""


class Notifier:
    """One pub/sub subscription per API process that wakes waiters; the job hash stays the truth.
    With ``local`` (``ldserve serve``), the in-process worker's stored hashes wake them first."""

    def __init__(self, client: aredis.Redis, queue: JobQueue, local: LocalResults | None = None,
                 on_local_read: Callable[[], None] | None = None) -> None:
        self.client = client
        self.queue = queue
        self.local = local
        self.on_local_read = on_local_read
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._on_images: dict[asyncio.Event, Callable[[list[bytes]], None]] = {}
        self._stored: dict[str, dict[bytes, bytes]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="ldserve-notifier")
        if self.local is not None:
            self.local.attach(asyncio.get_running_loop(), self._deliver, self._ahead)

    async def stop(self) -> None:
        if self.local is not None:
            self.local.detach()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _deliver(self, job_id: str, stored: dict[bytes, bytes] | None) -> None:
        evs = self._waiters.get(job_id)
        if evs:
            if stored is not None:
                self._stored[job_id] = stored
            for ev in evs:
                ev.set()

    def _ahead(self, job_id: str, images: list[bytes]) -> None:
        for ev in self._waiters.get(job_id, ()):
            hook = self._on_images.get(ev)
            if hook is not None:
                try:
                    hook(images)
                except Exception:  # noqa: BLE001 - a head start only: the waiter encodes on its own
                    log.exception("on_images for job %s failed", job_id)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.queue.keys.events)
                async for msg in pubsub.listen():
                    for ev in self._waiters.get(msg["data"].decode(), ()):
                        ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis restarts: resubscribe; waiters re-check the key on wake-up
                log.warning("event subscription lost (%s); resubscribing", e)
                for evs in self._waiters.values():
                    for ev in evs:
                        ev.set()
                await asyncio.sleep(0.5)

    async def _read(self, job_id: str, ev: asyncio.Event) -> Job | None:
        if self.local is not None and job_id not in self._stored and self.local.is_finishing(job_id):
            ev.clear()  # woken by FINISH's publish before the worker thread had its reply
            try:
                await asyncio.wait_for(ev.wait(), timeout=LOCAL_HANDOVER_WAIT_S)
            except asyncio.TimeoutError:
                pass
        stored = self._stored.get(job_id)
        if stored is None:
            return await self.queue.get(job_id)
        if self.on_local_read is not None:
            self.on_local_read()
        return parse_job(job_id, stored)

    async def wait(self, job_id: str, timeout_s: float,
                   on_images: Callable[[list[bytes]], None] | None = None) -> Job | None:
        """Wait until the job is terminal or the timeout passes; returns the job as last read (None if
        it no longer exists). Each check reads the whole hash, so the wake-up that finds the job
        terminal already holds its result: one Redis round trip instead of a status read and a get
        (none when the in-process worker handed the stored hash over). ``on_images`` (on this loop):
        the in-process worker's images of the job, ahead of storing them; not called otherwise."""
        ev = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(ev)
        if on_images is not None:
            self._on_images[ev] = on_images
        deadline = time.monotonic() + timeout_s
        retry_s = WAIT_RETRY_S
        try:
            while True:
                try:
                    job = await self._read(job_id, ev)  # registered first, so no event is missed
                except RedisError as e:
                    # Redis restarting or failing over: the job was accepted and may well finish, so
                    # the waiter rides the outage out until its deadline instead of answering 503
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    log.warning("reading job %s failed (%s); retrying in %.2f s", job_id, e, min(retry_s, left))
                    await asyncio.sleep(min(retry_s, left))
                    retry_s = min(WAIT_RETRY_MAX_S, 2 * retry_s)
                    continue
                retry_s = WAIT_RETRY_S
                left = deadline - time.monotonic()
                if job is None or job.terminal or left <= 0:
                    return job
                try:
                    await asyncio.wait_for(ev.wait(), timeout=left)
                except asyncio.TimeoutError:
                    pass
                ev.clear()
        finally:
            self._on_images.pop(ev, None)
            self._waiters[job_id].discard(ev)
            if not self._waiters[job_id]:
                del self._waiters[job_id]
                self._stored.pop(job_id, None)
