"""The message ledger: a message lost in transit is sent again.

kombu's Redis transport takes a message off the queue with BRPOP and records it as unacked
with a second command. If Redis stops between the two, the message is in neither place and
no one will ever answer its jobs. So every message Batchery pushes is also written, in the
same atomic script, to its queue's ledger with a time to check on it. Workers strike a
message off once its jobs are answered, or at once when they refuse it. A sweep looks at the
overdue entries: one held unacked by a worker, or still waiting in the queue, is given more
time; one in neither place was lost and is pushed again. Jobs are idempotent, so a message
sent twice is answered once.

What the sweep costs is bounded whatever the queue's length or its images' sizes: one worker
process sweeps a queue at a time (a lock), at most ``most`` overdue entries a sweep, and it
looks for each among the ``SCAN`` oldest queued messages only. An entry not found there
while more are queued is given more time (it can't be told from one still waiting), and is
looked at again once the queue is shorter. Entries older than ``expire_s`` are dropped: their
jobs' results would have expired anyway.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from itertools import product
from typing import Any

import redis

from producer.connections import ReplicaAcks
from producer.wire import (
    JOB_KEY_PREFIX,
    LANES,
    PRIORITIES,
    UNACKED_KEY,
    Message,
    backlog_key,
    ledger_due_key,
    ledger_jobs_key,
    ledger_key,
    ledger_lock_key,
    queue_keys,
)

#: How many of the oldest queued messages the sweep compares an overdue entry with.
SCAN = 1000

# KEYS: ledger, due, the queue's lists (one a lane and priority: wire.queue_keys), the jobs
# hash, the backlog counter.
# ARGV: limit (0: none), due time, now, the number of messages, then per message: the index of
# its list in KEYS, id, tag, job count, raw; then, if any jobs carry records, the record key
# prefix, their ttl, and a job id and record per job. An entry is "<tag> <pushed at> <list
# index> <raw>". The records are written first: a worker that answers a job finds its record.
# A message new to the ledger adds its jobs to the backlog (a push sent again after a lost
# reply adds nothing). Returns the number of messages pushed, or -1 (nothing written) if that
# would pass the limit (messages waiting, all priorities together).
_PUSH = """
local n = tonumber(ARGV[4])
local limit = tonumber(ARGV[1])
local jobs, backlog = KEYS[#KEYS - 1], KEYS[#KEYS]
if limit > 0 then
  local waiting = 0
  for k = 3, #KEYS - 2 do waiting = waiting + redis.call('LLEN', KEYS[k]) end
  if waiting + n > limit then return -1 end
end
local last = 4 + 5 * n
if #ARGV > last then
  local prefix, ttl = ARGV[last + 1], tonumber(ARGV[last + 2])
  for i = last + 3, #ARGV, 2 do
    redis.call('SET', prefix .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  end
end
for i = 5, last, 5 do
  redis.call('LPUSH', KEYS[tonumber(ARGV[i])], ARGV[i + 4])
  redis.call('HSET', KEYS[1], ARGV[i + 1],
             ARGV[i + 2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[i] .. ' ' .. ARGV[i + 4])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i + 1])
  if redis.call('HSETNX', jobs, ARGV[i + 1], ARGV[i + 3]) == 1 then
    redis.call('INCRBY', backlog, tonumber(ARGV[i + 3]))
  end
end
return n
"""

# KEYS: ledger, due, kombu's unacked hash, lock, the queue's lists as in _PUSH, the jobs hash,
# the backlog counter. ARGV:
# now, next check time, most to look at, oldest entry kept, lock time in ms, how many queued
# messages to scan. Returns how many lost messages were pushed again (-1: another process
# is sweeping).
_SWEEP = """
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', tonumber(ARGV[5])) then return -1 end
local jobs, backlog = KEYS[#KEYS - 1], KEYS[#KEYS]
local function forget(id)
  local count = redis.call('HGET', jobs, id)
  if count then
    redis.call('HDEL', jobs, id)
    if redis.call('DECRBY', backlog, tonumber(count)) < 0 then redis.call('SET', backlog, 0) end
  end
end
local resent = 0
local scan = tonumber(ARGV[6])
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[1], id)
  local a = entry and string.find(entry, ' ', 1, true)
  local b = a and string.find(entry, ' ', a + 1, true)
  local c = b and string.find(entry, ' ', b + 1, true)
  local list = c and KEYS[tonumber(string.sub(entry, b + 1, c - 1)) + 2]
  if not list then
    redis.call('ZREM', KEYS[2], id)
    if entry then redis.call('HDEL', KEYS[1], id) end
    forget(id)
  elseif tonumber(string.sub(entry, a + 1, b - 1)) < tonumber(ARGV[4]) then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[1], id)
    forget(id)
  else
    local tag, raw = string.sub(entry, 1, a - 1), string.sub(entry, c + 1)
    if redis.call('HEXISTS', KEYS[3], tag) == 0
        and not redis.call('LPOS', list, raw, 'RANK', -1, 'MAXLEN', scan)
        and redis.call('LLEN', list) <= scan then
      redis.call('LPUSH', list, raw)
      resent = resent + 1
    end
    redis.call('ZADD', KEYS[2], ARGV[2], id)
  end
end
return resent
"""


#: The push script, for a client the :class:`Ledger` does not hold (the gateway's asyncio one).
PUSH_SCRIPT = _PUSH


def push_command(
    queue: str, messages: Sequence[Message], check_after_s: float, limit: int = 0,
    records: Mapping[str, str] | None = None, ttl_s: int = 0,
) -> tuple[list[str], list[Any]]:  # fmt: skip
    """The push script's keys and arguments for these messages and job records (see
    :meth:`Ledger.push`)."""
    now = time.time()
    args: list[Any] = [limit, now + check_after_s, f"{now:.3f}", len(messages)]
    index = {(lane, priority): i + 3  # KEYS are 1-based
             for i, (lane, priority) in enumerate(product(LANES, PRIORITIES))}  # fmt: skip
    for message in messages:
        where = index[(message.lane, message.priority)]
        args += [where, message.id, message.tag, message.jobs, message.raw]
    if records:
        args += [JOB_KEY_PREFIX, ttl_s]
        for job_id, record in records.items():
            args += [job_id, record]
    lists = queue_keys(queue)
    counted = [ledger_jobs_key(queue), backlog_key(queue)]
    return [ledger_key(queue), ledger_due_key(queue), *lists, *counted], args


class Ledger:
    """One queue's ledger: the scripts are registered once, run by their sha after that."""

    def __init__(self, client: redis.Redis, queue: str, acks: ReplicaAcks | None = None) -> None:
        self.client = client
        self.queue = queue
        self.acks = acks or ReplicaAcks(0, 0.0)
        self.lists = queue_keys(queue)
        self.keys = (ledger_key(queue), ledger_due_key(queue))
        self._push = client.register_script(_PUSH)
        self._sweep = client.register_script(_SWEEP)
        self._loaded = False

    def push(
        self, messages: Sequence[Message], check_after_s: float, limit: int = 0,
        records: Mapping[str, str] | None = None, ttl_s: int = 0,
    ) -> int:  # fmt: skip
        """Push messages, each onto its priority's list, and record them, atomically;
        -1 (nothing written) if that would pass ``limit`` messages waiting.

        ``records``: job id -> its record (``wire.encode_job_record``), written in the same
        script, expiring after ``ttl_s``. With replica acks, returns once enough replicas hold
        the push (:class:`~producer.errors.ReplicaAckError` if they don't in time).
        """
        keys, args = push_command(self.queue, messages, check_after_s, limit, records, ttl_s)
        if not self._loaded:
            # Loaded first, by itself: a script unknown to Redis is refused (NOSCRIPT) and
            # redis-py then sends the whole call again, so a new producer's first push (a
            # `batchery submit`, a `classify` window: megabytes of images) crossed twice.
            self.client.script_load(_PUSH)
            self._loaded = True
        if not self.acks.replicas:
            return int(self._push(keys=keys, args=args))
        with self.client.pipeline(transaction=False) as pipe:
            self._push(keys=keys, args=args, client=pipe)
            self.acks.add(pipe)
            replies = pipe.execute()
        pushed = int(replies[0])
        if pushed >= 0:
            self.acks.check(replies, f"{pushed} messages pushed")
        return pushed

    def sweep(
        self, check_after_s: float, expire_s: float, every_s: float = 1.0, most: int = 20
    ) -> int:
        """Push again overdue messages that are neither queued nor held; return how many.

        Runs in one process at a time (for ``every_s``); 0 when another process swept.
        """
        now = time.time()
        keys = [*self.keys, UNACKED_KEY, ledger_lock_key(self.queue), *self.lists,
                ledger_jobs_key(self.queue), backlog_key(self.queue)]  # fmt: skip
        args = [now, now + check_after_s, most, now - expire_s, int(every_s * 1000), SCAN]
        return max(0, int(self._sweep(keys=keys, args=args)))

    def strike(self, message_ids: Sequence[str]) -> None:
        """Strike messages off at once (refused ones: they will never be answered)."""
        with self.client.pipeline(transaction=False) as pipe:
            settle(pipe, self.queue, message_ids)
            pipe.execute()


def settle(pipe: Any, queue: str, message_ids: Sequence[str]) -> None:
    """Strike answered messages off ``queue``'s ledger, and their jobs off its backlog (added
    to a pipeline the caller runs)."""
    if message_ids:
        keys = [ledger_key(queue), ledger_due_key(queue), ledger_jobs_key(queue),
                backlog_key(queue)]  # fmt: skip
        pipe.eval(_SETTLE, len(keys), *keys, *message_ids)


def settle_part(pipe: Any, queue: str, message_id: str, jobs: int) -> None:
    """``jobs`` of a split message's jobs were answered (by one of its parts): take them off
    the backlog now, and off its count in the ledger, so the backlog stays the jobs not
    answered; the message itself is struck off by :func:`settle` once every part is done
    (added to a pipeline the caller runs)."""
    if jobs > 0:
        pipe.eval(_SETTLE_PART, 2, ledger_jobs_key(queue), backlog_key(queue), message_id, jobs)


def backlog(client: redis.Redis, queue: str) -> int:
    """Jobs pushed on ``queue`` through the ledger and not answered yet (see
    :func:`producer.wire.backlog_key`)."""
    return backlog_jobs(client.get(backlog_key(queue)))


def backlog_jobs(raw: bytes | str | None) -> int:
    """The backlog from a GET of :func:`producer.wire.backlog_key` (for readers that fetch it
    in their own pipeline): 0 when unset."""
    return max(0, int(raw or 0))


# KEYS: ledger, due, jobs hash, backlog counter. ARGV: message ids.
# KEYS: the jobs hash, the backlog counter. ARGV: message id, jobs answered by one part.
_SETTLE_PART = """
local count = redis.call('HGET', KEYS[1], ARGV[1])
if not count then return 0 end
local n = math.min(tonumber(ARGV[2]), tonumber(count))
if n <= 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], tonumber(count) - n)
if redis.call('DECRBY', KEYS[2], n) < 0 then redis.call('SET', KEYS[2], 0) end
return n
"""

_SETTLE = """
local gone = 0
for _, id in ipairs(ARGV) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local count = redis.call('HGET', KEYS[3], id)
  if count then
    redis.call('HDEL', KEYS[3], id)
    gone = gone + tonumber(count)
  end
end
if gone > 0 and redis.call('DECRBY', KEYS[4], gone) < 0 then redis.call('SET', KEYS[4], 0) end
return gone
"""
