"""``batchery status``: what the queue and its workers are doing, read from Redis alone."""

from __future__ import annotations

from typing import Any

from producer.client import Client
from producer.settings import redact_url
from producer.wire import DEAD_LETTER_KEY, HEARTBEAT_PREFIX, STATS_KEY, UNACKED_KEY


def collect(client: Client) -> dict[str, Any]:
    """Queue depth, messages in flight, live worker processes, counters, dead letters."""
    r = client.redis
    workers = sorted(
        key.decode()[len(HEARTBEAT_PREFIX) :]
        for key in r.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=1000)
    )
    with r.pipeline(transaction=False) as pipe:
        pipe.llen(client.settings.queue)
        pipe.hlen(UNACKED_KEY)
        pipe.hgetall(STATS_KEY)
        pipe.llen(DEAD_LETTER_KEY)
        depth, in_flight, stats, dead = pipe.execute()
    stats = {k.decode(): v.decode() for k, v in stats.items()}
    return {
        "redis": redact_url(client.settings.redis_url),
        "queue": client.settings.queue,
        "queue_depth": depth,
        "in_flight": in_flight,
        "workers_alive": len(workers),
        "workers": workers,
        "done": int(stats.get("done", 0)),
        "failed": int(stats.get("failed", 0)),
        "batches": int(stats.get("batches", 0)),
        "dead_letters": dead,
    }


def render(status: dict[str, Any]) -> str:
    """The status as a few aligned lines."""
    lines = [
        f"redis          {status['redis']}",
        f"queue          {status['queue']}: {status['queue_depth']} messages waiting, "
        f"{status['in_flight']} in flight",
        f"workers alive  {status['workers_alive']}"
        + (f" ({', '.join(status['workers'])})" if status["workers"] else ""),
        f"jobs           {status['done']} done, {status['failed']} failed, "
        f"in {status['batches']} batches",
        f"dead letters   {status['dead_letters']}",
    ]
    return "\n".join(lines)
