"""Worker side of the job queue (sync redis-py): claim, recover, start, finish, dead-letter, heartbeat."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import ResponseError

from .keys import EVENTS_MAXLEN, FINISH, READ_IF_JOINS, START, TERMINATE, Keys
from .spec import JobSpec

log = logging.getLogger(__name__)
OWNER_GONE_ERROR = json.dumps({"message": "the API process whose client waited for this job is gone",
                               "type": "server_error", "param": None, "code": "owner_gone"})


@dataclass
class Entry:
    entry_id: str
    job_id: str
    deliveries: int = 1
    claimed_at: float = 0.0
    """time.monotonic() when this worker took the entry."""
    created_ms: int = 0
    """From the stream ID (Redis clock)."""
    started_ms: int = 0
    """Redis clock when the job was marked processing."""
    spec_json: bytes | None = None
    """The job's spec as the entry carries it (entries written before it did: None)."""
    owner: str | None = None
    """The API process whose client alone waits on the job (``Keys.api_lease``), if any."""


def _entry(eid: bytes, fields: dict[bytes, bytes] | None, deliveries: int = 1) -> Entry | None:
    if not fields or b"job_id" not in fields:
        return None
    e = eid.decode()
    owner = fields.get(b"owner")
    return Entry(e, fields[b"job_id"].decode(), deliveries, time.monotonic(), int(e.split("-")[0]),
                 spec_json=fields.get(b"spec"), owner=owner.decode() if owner else None)


class WorkerQueue:
    def __init__(self, client: redis.Redis, keys: Keys, *, job_ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.job_ttl_s = job_ttl_s
        self._claim_cursor = "0-0"
        self._start = client.register_script(START)
        self._finish = client.register_script(FINISH)
        self._terminate = client.register_script(TERMINATE)
        self._read_if_joins = client.register_script(READ_IF_JOINS)

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read_new(self, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        resp = self.client.xreadgroup(self.keys.group, consumer, {self.keys.stream: ">"}, count=count,
                                      block=block_ms)
        out = []
        for _stream, items in resp or []:
            out.extend(e for e in (_entry(eid, f) for eid, f in items) if e is not None)
        return out

    def read_if_joins(self, consumer: str, batch_tag: str, room: int) -> Entry | None:
        """The next unread entry, claimed only if its job joins the batch being gathered (``batch_tag``,
        at most ``room`` images); None if there is none or it does not join (it stays for others)."""
        got = self._read_if_joins(keys=[self.keys.stream], args=[self.keys.group, consumer, batch_tag, room])
        if got[0] != b"read":
            return None
        for _stream, items in got[1] or []:
            for eid, flat in items:  # a script's reply: fields as a flat list
                e = _entry(eid, dict(zip(flat[::2], flat[1::2], strict=True)))
                if e is not None:
                    return e
                self.client.xack(self.keys.stream, self.keys.group, eid)  # entry body gone: nothing to run
        return None

    def autoclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """XAUTOCLAIM entries idle past the threshold (their worker stopped touching them: it died).
        Each call goes on where the last one stopped: Redis 7 scans at most 10 x ``count`` pending
        entries per call, so always starting over at 0-0 would never reach a dead worker's entries
        behind that many live ones."""
        resp = self.client.xautoclaim(self.keys.stream, self.keys.group, consumer, min_idle_ms,
                                      self._claim_cursor, count=count)
        cursor = resp[0] if resp else b"0-0"
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        items = resp[1] if resp else []
        out = []
        for eid, fields in items:
            if eid is None:  # (Redis 6.2: a deleted entry still pending; nothing to run or ack by id)
                continue
            e = _entry(eid, fields, self.delivery_count(eid.decode()))
            if e is not None:
                out.append(e)
            else:  # entry body gone: nothing to run
                self.client.xack(self.keys.stream, self.keys.group, eid)
        return out

    def delivery_count(self, entry_id: str) -> int:
        rows = self.client.xpending_range(self.keys.stream, self.keys.group, min=entry_id, max=entry_id, count=1)
        return int(rows[0]["times_delivered"]) if rows else 1

    def touch(self, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this worker holds (XCLAIM JUSTID does not count a delivery)."""
        if entry_ids:
            self.client.xclaim(self.keys.stream, self.keys.group, consumer, 0, entry_ids, justid=True)

    def start(self, job_id: str, consumer: str, owner: str | None = None) -> tuple[str, int, int]:
        """(status, now_ms, deadline_ms); status 'processing' means run it; 'owner_gone': START
        canceled it, ``owner`` (the API process its client waited on, from its entry; None: not
        judged) being gone."""
        job = self.keys.job(job_id)
        st, now, deadline = self._start(
            keys=[job, self.keys.stream, self.keys.job_events(job_id), self.keys.api_lease(owner) if owner else job],
            args=[consumer, self.keys.events, job_id, OWNER_GONE_ERROR, "1" if owner else "0"])
        return st.decode(), int(now), int(deadline)

    def status(self, job_id: str) -> str | None:
        status = self.client.hget(self.keys.job(job_id), "status")
        return status.decode() if status is not None else None

    def gone_owners(self, owners: set[str]) -> set[str]:
        """Which of these API processes no longer hold their lease."""
        if not owners:
            return set()
        names = sorted(owners)
        pipe = self.client.pipeline(transaction=False)
        for o in names:
            pipe.exists(self.keys.api_lease(o))
        return {o for o, n in zip(names, pipe.execute(), strict=True) if not n}

    def cancel_orphan(self, job_id: str) -> bool:
        """End a running job whose owner is gone as canceled (``owner_gone``); its id is published
        as any cancel's, so the worker's CancelWatch stops it between scales. False if it had ended."""
        prev = self._terminate(keys=[self.keys.job(job_id), self.keys.stream, self.keys.job_events(job_id)],
                               args=["canceled", OWNER_GONE_ERROR, self.keys.events, job_id, self.keys.group])
        return prev in (b"queued", b"processing")

    def spec(self, entry: Entry) -> JobSpec:
        """From the entry, else (an entry without one) from the job hash: KeyError if it expired."""
        raw = entry.spec_json if entry.spec_json is not None else self.client.hget(self.keys.job(entry.job_id), "spec")
        if raw is None:
            raise KeyError(entry.job_id)
        return JobSpec.model_validate_json(raw)

    def finish(self, entry: Entry, status: str, fields: dict[str, Any]) -> dict[bytes, bytes] | None:
        """Store the outcome (only if still live), then XACK + XDEL, atomically. Returns None if
        the job had ended already, else what its hash holds now, as HGETALL would read it (the
        fields parse_job reads: status, times, spec and ``fields``), without the round trip."""
        args: list[Any] = [self.keys.group, entry.entry_id, status, self.job_ttl_s, self.keys.events, entry.job_id]
        for k, v in fields.items():
            args += [k, v]
        got = self._finish(keys=[self.keys.job(entry.job_id), self.keys.stream, self.keys.job_events(entry.job_id)],
                           args=args)
        if not int(got[0]):
            return None
        completed_ms, spec, created_ms, started_ms = got[1:5]
        stored = {b"status": status.encode(), b"completed_ms": completed_ms, b"spec": spec, b"created_ms": created_ms}
        if started_ms is not None:
            stored[b"started_ms"] = started_ms
        stored.update({k.encode(): self.client.get_encoder().encode(v) for k, v in fields.items()})
        return stored

    def fail(self, entry: Entry, status: str, code: str, message: str) -> bool:
        err = json.dumps({"message": message, "type": "server_error", "code": code, "param": None})
        return self.finish(entry, status, {"error": err}) is not None

    def dead_letter(self, entry: Entry, reason: str) -> bool:
        """To the dead-letter stream, and the job failed; False if it had ended already (canceled)."""
        self.client.xadd(self.keys.dlq, {"job_id": entry.job_id, "entry_id": entry.entry_id, "reason": reason},
                         maxlen=10_000, approximate=True)
        return self.fail(entry, "failed", "dead_lettered", reason)

    def add_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Append (job_id, fields) events to their jobs' event streams, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id, fields in events:
            key = self.keys.job_events(job_id)
            pipe.xadd(key, fields, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(key, self.job_ttl_s)
        pipe.execute()

    def heartbeat(self, consumer: str, info: dict[str, Any]) -> None:
        self.client.hset(self.keys.workers, consumer, json.dumps({**info, "ts": time.time()}))

    def remove_worker(self, consumer: str) -> None:
        self.client.hdel(self.keys.workers, consumer)

    def prune(self, consumer: str, stale_after_s: float) -> tuple[int, int]:
        """Forget workers that died without removing themselves (SIGKILL, OOM, a lost node): their
        registry entries whose heartbeat is older than ``stale_after_s``, and their consumers in the
        group once they hold no pending entry (XAUTOCLAIM takes those first) and have been idle that
        long. Both grew with every worker process ever started. Returns (entries, consumers) removed."""
        now, entries = time.time(), 0
        for name, raw in self.client.hgetall(self.keys.workers).items():
            try:
                ts = float(json.loads(raw)["ts"])
            except (ValueError, KeyError, TypeError):
                ts = 0.0
            if name.decode() != consumer and now - ts > stale_after_s:
                entries += self.client.hdel(self.keys.workers, name)
        consumers = 0
        for c in self.client.xinfo_consumers(self.keys.stream, self.keys.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name != consumer and c["pending"] == 0 and c["idle"] > stale_after_s * 1000:
                consumers += self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, name) == 0
        return entries, consumers
