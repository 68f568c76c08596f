"""The message ledger: a message lost in transit is sent again.

kombu's Redis transport takes a message off the queue with BRPOP and records it as unacked
with a second command. If Redis stops between the two, the message is in neither place and
no one will ever answer its jobs. So every message Batchery pushes is also written, in the
same atomic script, to a ledger with a time to check on it. Workers strike a message off
once its jobs are answered. A sweep, run by every worker process each second, looks at the
overdue entries: one still waiting in the queue, or held unacked by a worker, is given more
time; one that is in neither place was lost and is pushed again. Jobs are idempotent, so a
message sent twice is answered once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from producer.wire import LEDGER_DUE_KEY, LEDGER_KEY, UNACKED_KEY, Message

# KEYS: queue, ledger, due. ARGV: limit (0: none), due time, then id, tag, raw per message.
# Returns the number pushed, or -1 (nothing pushed) if that would pass the limit.
_PUSH = """
local n = (#ARGV - 2) / 3
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('LLEN', KEYS[1]) + n > limit then return -1 end
for i = 3, #ARGV, 3 do
  redis.call('LPUSH', KEYS[1], ARGV[i + 2])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[i])
end
return n
"""

# KEYS: queue, ledger, due, kombu's unacked hash. ARGV: now, next check time, most to look at.
# Returns how many lost messages were pushed again.
_SWEEP = """
local resent = 0
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  if not entry then
    redis.call('ZREM', KEYS[3], id)
  else
    local space = string.find(entry, ' ', 1, true)
    local tag, raw = string.sub(entry, 1, space - 1), string.sub(entry, space + 1)
    local queued = redis.call('LPOS', KEYS[1], raw, 'RANK', -1)
    if not queued and redis.call('HEXISTS', KEYS[4], tag) == 0 then
      redis.call('LPUSH', KEYS[1], raw)
      resent = resent + 1
    end
    redis.call('ZADD', KEYS[3], ARGV[2], id)
  end
end
return resent
"""


def push(
    client: redis.Redis, queue: str, messages: Sequence[Message], check_after_s: float,
    limit: int = 0,
) -> int:  # fmt: skip
    """Push messages and record them in the ledger, atomically; -1 if over ``limit``."""
    args: list[Any] = [limit, time.time() + check_after_s]
    for message in messages:
        args += [message.id, message.tag, message.raw]
    return int(client.eval(_PUSH, 3, queue, LEDGER_KEY, LEDGER_DUE_KEY, *args))


def settle(pipe: Any, message_ids: Sequence[str]) -> None:
    """Strike answered messages off the ledger (added to a pipeline the caller executes)."""
    if message_ids:
        pipe.hdel(LEDGER_KEY, *message_ids)
        pipe.zrem(LEDGER_DUE_KEY, *message_ids)


def sweep(client: redis.Redis, queue: str, check_after_s: float, most: int = 100) -> int:
    """Push again the overdue messages that are neither queued nor held; return how many."""
    now = time.time()
    return int(
        client.eval(
            _SWEEP,
            4,
            queue,
            LEDGER_KEY,
            LEDGER_DUE_KEY,
            UNACKED_KEY,
            now,
            now + check_after_s,
            most,
        )
    )
