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
from collections.abc import Sequence
from typing import Any

import redis

from producer.wire import UNACKED_KEY, Message, ledger_due_key, ledger_key, ledger_lock_key

#: How many of the oldest queued messages the sweep compares an overdue entry with.
SCAN = 1000

# KEYS: queue, ledger, due. ARGV: limit (0: none), due time, now, then id, tag, raw per message.
# Returns the number pushed, or -1 (nothing pushed) if that would pass the limit.
_PUSH = """
local n = (#ARGV - 3) / 3
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('LLEN', KEYS[1]) + n > limit then return -1 end
for i = 4, #ARGV, 3 do
  redis.call('LPUSH', KEYS[1], ARGV[i + 2])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[3] .. ' ' .. ARGV[i + 2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[i])
end
return n
"""

# KEYS: queue, ledger, due, kombu's unacked hash, lock. ARGV: now, next check time, most to
# look at, oldest entry kept, lock time in ms, how many queued messages to scan.
# Returns how many lost messages were pushed again (-1: another process is sweeping).
_SWEEP = """
if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', tonumber(ARGV[5])) then return -1 end
local resent = 0
local scan = tonumber(ARGV[6])
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  local first = entry and string.find(entry, ' ', 1, true)
  local second = first and string.find(entry, ' ', first + 1, true)
  if not second then
    redis.call('ZREM', KEYS[3], id)
    if entry then redis.call('HDEL', KEYS[2], id) end
  elseif tonumber(string.sub(entry, first + 1, second - 1)) < tonumber(ARGV[4]) then
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[2], id)
  else
    local tag, raw = string.sub(entry, 1, first - 1), string.sub(entry, second + 1)
    if redis.call('HEXISTS', KEYS[4], tag) == 0
        and not redis.call('LPOS', KEYS[1], raw, 'RANK', -1, 'MAXLEN', scan)
        and redis.call('LLEN', KEYS[1]) <= scan then
      redis.call('LPUSH', KEYS[1], raw)
      resent = resent + 1
    end
    redis.call('ZADD', KEYS[3], ARGV[2], id)
  end
end
return resent
"""


class Ledger:
    """One queue's ledger: the scripts are registered once, run by their sha after that."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.keys = (queue, ledger_key(queue), ledger_due_key(queue))
        self._push = client.register_script(_PUSH)
        self._sweep = client.register_script(_SWEEP)

    def push(self, messages: Sequence[Message], check_after_s: float, limit: int = 0) -> int:
        """Push messages and record them, atomically; -1 (nothing pushed) if over ``limit``."""
        now = time.time()
        args: list[Any] = [limit, now + check_after_s, f"{now:.3f}"]
        for message in messages:
            args += [message.id, message.tag, message.raw]
        return int(self._push(keys=self.keys, args=args))

    def sweep(
        self, check_after_s: float, expire_s: float, every_s: float = 1.0, most: int = 20
    ) -> int:
        """Push again overdue messages that are neither queued nor held; return how many.

        Runs in one process at a time (for ``every_s``); 0 when another process swept.
        """
        now = time.time()
        keys = [*self.keys, UNACKED_KEY, ledger_lock_key(self.queue)]
        args = [now, now + check_after_s, most, now - expire_s, int(every_s * 1000), SCAN]
        return max(0, int(self._sweep(keys=keys, args=args)))

    def strike(self, message_ids: Sequence[str]) -> None:
        """Strike messages off at once (refused ones: they will never be answered)."""
        with self.client.pipeline(transaction=False) as pipe:
            settle(pipe, self.queue, message_ids)
            pipe.execute()


def settle(pipe: Any, queue: str, message_ids: Sequence[str]) -> None:
    """Strike answered messages off ``queue``'s ledger (added to a pipeline the caller runs)."""
    if message_ids:
        pipe.hdel(ledger_key(queue), *message_ids)
        pipe.zrem(ledger_due_key(queue), *message_ids)
