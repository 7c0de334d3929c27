"""Redis key layout and the Lua scripts that make queue transitions atomic."""

from __future__ import annotations

import hashlib


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:jobs"
        self.group = "workers"
        self.dlq = f"{prefix}:dlq"
        self.events = f"{prefix}:events"
        self.workers = f"{prefix}:workers"
        self.url_signing_key = f"{prefix}:url_signing_key"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def job_events(self, job_id: str) -> str:
        """Stream of a job's progress events (``EVENT_TAIL`` in the scripts that end a job)."""
        return f"{self.prefix}:jobevents:{job_id}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    def api_lease(self, instance: str) -> str:
        """Exists while the API process ``instance`` runs (``ApiLease``): the owner of the jobs its
        synchronous and streaming clients wait on."""
        return f"{self.prefix}:api:{instance}"


REDIS_SOCKET_TIMEOUT_S = 30.0
"""Socket timeout of every Redis client of the service: above its longest blocking call (an event
stream's XREAD waits up to 15 s, a worker's XREADGROUP up to ``block_ms`` <= 10 s). redis-py 8's
default is 5 s, which cut every event stream whose job was quiet for 5 s."""
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_CLIENT_OPTIONS = {"health_check_interval": 30, "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
                        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S}
"""Options of every Redis client of the service (the API's async one, the worker's)."""

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

EVENTS_MAXLEN = 256
"""Entries a job's event stream keeps (progress per scale, partial images, the end)."""
# The end of a job as the last entry of its event stream (Keys.job_events), written by the same
# script that ends it, so a reader that saw the job live then waits on the stream alone. ``ttl``
# as the job's. The stream is KEYS[3]; expects locals ``status`` and ``ttl``.
_END_EVENT = """
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '""" + str(EVENTS_MAXLEN) + """', '*', 'type', status)
redis.call('EXPIRE', KEYS[3], ttl)
"""

# KEYS: stream, job, idem, owner's lease (the job key again when none) ; ARGV: max_len, trim_len, job_id, spec,
# timeout_ms, ttl, payload_hash, idem_ttl, use_idem, job key prefix, owner ('' none: the API instance
# whose client alone waits on the job), lease ms, batch key, images (an owner is alive as it enqueues:
# its lease is set here too, so a Redis that came back empty cannot cancel the jobs it admits before
# its next renewal; ``ApiLease``). The stream entry carries the spec (~0.5 KB), owner, batch key and
# image count too, so a worker need not read the job hash (nor claim a job to learn if it joins a batch).
ENQUEUE = _NOW + """
if ARGV[9] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local sep = string.find(existing, ' ')
    local jid = string.sub(existing, 1, sep - 1)
    local prev = redis.call('HGET', ARGV[10] .. jid, 'status')
    -- a job that expired or was canceled never gave a result: the retry is a new attempt
    if prev and prev ~= 'expired' and prev ~= 'canceled' then
      return {'dup', jid, string.sub(existing, sep + 1)}
    end
  end
end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', tostring(depth), ''} end
local deadline = 0
if tonumber(ARGV[5]) > 0 then deadline = now + tonumber(ARGV[5]) end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'job_id', ARGV[3], 'deadline_ms', deadline,
                      'spec', ARGV[4], 'owner', ARGV[11], 'batch_key', ARGV[13], 'n', ARGV[14])
redis.call('HSET', KEYS[2], 'status', 'queued', 'created_ms', now, 'deadline_ms', deadline, 'spec', ARGV[4],
           'entry_id', id, 'owner', ARGV[11])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[9] == '1' then redis.call('SET', KEYS[3], ARGV[3] .. ' ' .. ARGV[7], 'EX', ARGV[8]) end
if ARGV[11] ~= '' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[12]) end
return {'ok', id, ''}
"""

# KEYS: job, stream, job events ; ARGV: new_status, error_json, events_channel, job_id, group -> previous status
# or nil. A queued job's stream entry is acked and deleted at once, so it stops counting against
# max_queue_len; if a worker read it already, its START sees the terminal status (and acks nothing
# more). The ack keeps the waiting count (XLEN - pending) exact: deleted alone, a read entry left
# XLEN but not the pending list, and after its worker died XAUTOCLAIM handed it out again (counted
# as a redelivery, dead-lettered at MAX_DELIVERIES although its client had canceled it).
TERMINATE = _NOW + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' or st == 'processing' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'completed_ms', now, 'error', ARGV[2])
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  local status, ttl = ARGV[1], redis.call('TTL', KEYS[1])
  if ttl > 0 then """ + _END_EVENT + """ end
end
if st == 'queued' then
  local eid = redis.call('HGET', KEYS[1], 'entry_id')
  if eid then
    pcall(redis.call, 'XACK', KEYS[2], ARGV[5], eid)
    redis.call('XDEL', KEYS[2], eid)
  end
end
return st
"""

# KEYS: job ; ARGV: n, file_0 .. file_{n-1} -> 1 stored, 0 already stored, -1 no such job (expired:
# HSET alone would recreate the key without its TTL)
STORE_FILES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'file0') == 1 then return 0 end
for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'file' .. (i - 1), ARGV[i + 1]) end
return 1
"""

# KEYS: job ; ARGV: n -> 1 img0..img{n-1} dropped and the record marked, 0 no such job
DROP_IMAGES = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, tonumber(ARGV[1]) do redis.call('HDEL', KEYS[1], 'img' .. (i - 1)) end
redis.call('HSET', KEYS[1], 'images_dropped', '1')
return 1
"""

# KEYS: job, stream, job events, owner's lease (its stream entry names the owner) ; ARGV: consumer, events
# channel, job_id, owner_gone error, '1' if it has an owner -> {status, now, deadline_ms} ; queued/processing
# -> processing unless expired, or canceled here ('owner_gone') when the API process whose client waits
# on it no longer holds its lease
START = _NOW + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', now, 0} end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or '0')
if (st == 'queued' or st == 'processing') and deadline > 0 and now > deadline then
  return {'past_deadline', now, deadline}
end
if (st == 'queued' or st == 'processing') and ARGV[5] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_ms', now, 'error', ARGV[4])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  local status, ttl = 'canceled', redis.call('TTL', KEYS[1])
  if ttl > 0 then """ + _END_EVENT + """ end
  return {'owner_gone', now, deadline}
end
if st == 'queued' or st == 'processing' then
  redis.call('HSET', KEYS[1], 'status', 'processing', 'started_ms', now, 'worker', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
  return {'processing', now, deadline}
end
return {st, now, deadline}
"""

# KEYS: stream ; ARGV: group, consumer, batch key, room (images) -> {'read', XREADGROUP's reply} for the next
# entry nobody read yet if its job joins the batch being gathered (same batch key, n <= room; an entry
# without them, written by an older API, is read too), else {'stop'}: a worker gathering a batch
# claims no job it cannot run in it, which stays in the stream for idle workers (it held one before).
READ_IF_JOINS = """
local last
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, lid
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then lid = g[i + 1] end
  end
  if name == ARGV[1] then last = lid end
end
if not last then return redis.error_reply('NOGROUP no such consumer group ' .. ARGV[1]) end
local nxt = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #nxt == 0 then return {'stop'} end
local f, key, n = nxt[1][2], nil, nil
for i = 1, #f, 2 do
  if f[i] == 'batch_key' then key = f[i + 1] elseif f[i] == 'n' then n = tonumber(f[i + 1]) end
end
if key and (key ~= ARGV[3] or (n or 1) > tonumber(ARGV[4])) then return {'stop'} end
return {'read', redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')}
"""

# KEYS: job, stream, job events ; ARGV: group, entry_id, status, ttl, events_channel, job_id, field1, value1, ...
# Stores the outcome only if the job is still live, then XACK + XDEL: the ack follows the store.
# Returns {0}, or {1, completed_ms, spec, created_ms, started_ms}: with the status and the fields
# the caller wrote, the job's hash as stored (WorkerQueue.finish), without reading the images back.
FINISH = _NOW + """
local st = redis.call('HGET', KEYS[1], 'status')
local stored = 0
if st == 'queued' or st == 'processing' then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'completed_ms', now)
  for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  local status, ttl = ARGV[3], ARGV[4]
""" + _END_EVENT + """
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if stored == 0 then return {0} end
local meta = redis.call('HMGET', KEYS[1], 'spec', 'created_ms', 'started_ms')
return {1, tostring(now), meta[1], meta[2], meta[3]}
"""
