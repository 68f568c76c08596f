"""``batchery status``: what the queue and its workers are doing, read from Redis (and the
registry's rollouts, where the registry is visible)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from producer.client import Client
from producer.errors import BatcheryError
from producer.ledger import backlog_jobs
from producer.registry import Registry
from producer.settings import redact_url
from producer.stopping import stop_on_signals
from producer.wire import (
    DEAD_LETTER_KEY,
    HEARTBEAT_PREFIX,
    LANES,
    PRIORITIES,
    STATS_KEY,
    UNACKED_KEY,
    WEBHOOK_STREAM,
    backlog_key,
    heartbeat_key,
    queue_key,
    rollout_stopped_key,
)


def collect(client: Client) -> dict[str, Any]:
    """Queue depth, messages in flight, live worker processes, counters, dead letters.

    ``computed_twice``: jobs computed again after they were answered (the second answer was
    discarded); ``cancelled_late``: jobs cancelled while their batch ran (computed, the
    answer discarded); ``refused``: jobs refused without a valid id to answer them by.
    """
    r = client.redis
    workers = sorted(
        key.decode()[len(HEARTBEAT_PREFIX) :]
        for key in r.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=1000)
    )
    # Each heartbeat holds its worker's kind (``full``, ``lite``; "1" before kinds: full).
    kinds = [k.decode() if isinstance(k, bytes) else k
             for k in (r.mget([heartbeat_key(w) for w in workers]) if workers else [])]  # fmt: skip
    with r.pipeline(transaction=False) as pipe:
        for lane in LANES:
            for priority in PRIORITIES:
                pipe.llen(queue_key(client.settings.queue, priority, lane))
        pipe.hlen(UNACKED_KEY)
        pipe.hgetall(STATS_KEY)
        pipe.llen(DEAD_LETTER_KEY)
        pipe.xlen(WEBHOOK_STREAM)
        pipe.get(backlog_key(client.settings.queue))
        *depths, in_flight, stats, dead, hooks, backlog = pipe.execute()
    stats = {k.decode(): v.decode() for k, v in stats.items()}
    per_list = [int(d) for d in depths]
    by_priority = {p: sum(per_list[i :: len(PRIORITIES)]) for i, p in enumerate(PRIORITIES)}
    return {
        "redis": redact_url(client.settings.redis_url),
        "queue": client.settings.queue,
        "queue_depth": sum(by_priority.values()),
        "queue_depth_by_priority": by_priority,
        "in_flight": in_flight,
        "backlog_jobs": backlog_jobs(backlog),
        "workers_alive": len(workers),
        "workers": workers,
        "worker_kinds": {
            "full": sum(k is not None and k != "lite" for k in kinds),
            "lite": sum(k == "lite" for k in kinds),
        },
        "done": int(stats.get("done", 0)),
        "failed": int(stats.get("failed", 0)),
        "batches": int(stats.get("batches", 0)),
        "cancelled": int(stats.get("cancelled", 0)),
        "expired": int(stats.get("expired", 0)),
        "computed_twice": int(stats.get("computed_twice", 0)),
        "cancelled_late": int(stats.get("cancelled_late", 0)),
        "refused": int(stats.get("refused", 0)),
        "dead_letters": dead,
        "webhooks_pending": hooks,
        "webhooks_delivered": int(stats.get("webhooks_delivered", 0)),
        "webhooks_failed": int(stats.get("webhooks_failed", 0)),
        "canary_promoted": int(stats.get("canary_promoted", 0)),
        "canary_rolled_back": int(stats.get("canary_rolled_back", 0)),
        "rollouts": rollouts(client),
    }


def rollouts(client: Client) -> dict[str, dict[str, Any]]:
    """Each model's shadow and canary (as the registry holds them; a canary stopped by the
    switch in Redis says so). Unreadable ones are shown with the reason."""
    registry = Registry.from_settings(client.settings)
    found: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        try:
            rollout = registry.rollout(name)
        except (BatcheryError, OSError, ValueError) as exc:
            found[name] = {"error": str(exc)}
            continue
        if rollout:
            stopped = client.redis.get(rollout_stopped_key(name))
            canary = rollout.get("canary")
            stop = bool(canary) and stopped in (str(canary), str(canary).encode())
            found[name] = {**rollout, "canary_stopped": stop}
    return found


def render(status: dict[str, Any]) -> str:
    """The status as a few aligned lines (with rates, when :func:`watch` added them)."""
    lines = [
        f"redis          {status['redis']}",
        f"queue          {status['queue']}: {status['queue_depth']} messages waiting ("
        + ", ".join(f"{p} {n}" for p, n in status["queue_depth_by_priority"].items())
        + f"), {status['in_flight']} in flight",
        f"backlog        {status['backlog_jobs']} jobs not answered yet (waiting, buffered, "
        "running)",
        f"workers alive  {status['workers_alive']}"
        + (
            f" ({status['worker_kinds']['full']} TensorFlow: every format, "
            f"{status['worker_kinds']['lite']} lite: LiteRT only)"
            if status.get("worker_kinds", {}).get("lite")
            else ""
        )
        + (f" ({', '.join(status['workers'])})" if status["workers"] else ""),
        f"jobs           {status['done']} done, {status['failed']} failed, "
        f"{status['cancelled']} cancelled, {status['expired']} expired, "
        f"in {status['batches']} batches",
        f"               {status['computed_twice']} computed twice (answered once), "
        f"{status['cancelled_late']} computed after being cancelled, "
        f"{status['refused']} refused without an id",
        f"dead letters   {status['dead_letters']}",
        f"webhooks       {status['webhooks_pending']} to deliver, "
        f"{status['webhooks_delivered']} delivered, {status['webhooks_failed']} given up",
    ]
    if status.get("rollouts") or status.get("canary_promoted") or status.get("canary_rolled_back"):
        lines.append(f"canaries       {status['canary_promoted']} promoted, "
                     f"{status['canary_rolled_back']} rolled back")  # fmt: skip
    for name, r in status.get("rollouts", {}).items():
        if "error" in r:
            lines.append(f"rollout        {name}: ignored ({r['error']})")
            continue
        if r.get("shadow"):
            lines.append(f"rollout        {name}: shadow {name}@{r['shadow']} on "
                         f"{r['shadow_percent']:g}% of jobs")  # fmt: skip
        if r.get("canary"):
            state = "stopped (rolled back)" if r["canary_stopped"] else "answering"
            lines.append(f"rollout        {name}: canary {name}@{r['canary']} on "
                         f"{r['canary_percent']:g}% of jobs, {state}")  # fmt: skip
    if "jobs_per_s" in status:
        lines.append(
            f"rate           {status['jobs_per_s']:.0f} jobs/s, "
            f"{status['failed_per_s']:.0f} failed/s, {status['batches_per_s']:.0f} batches/s"
            f" (over {status['interval_s']:.1f} s)"
        )
    return "\n".join(lines)


def with_rates(status: dict[str, Any], before: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``status`` with per-second rates of its counters since ``before``."""
    rate = {
        f"{name}_per_s": max(0, status[counter] - before[counter]) / max(seconds, 1e-9)
        for name, counter in (("jobs", "done"), ("failed", "failed"), ("batches", "batches"))
    }
    return {**status, **rate, "interval_s": seconds}


def watch(client: Client, interval: float, as_json: bool = False, out: TextIO = sys.stdout) -> None:
    """Show the status every ``interval`` seconds, with rates, until interrupted.

    On a terminal each refresh redraws the screen; otherwise (a pipe, a log) each is printed
    after the last, as text or one JSON object a line.
    """
    redraw = out.isatty() and not as_json
    with stop_on_signals() as stop:
        try:
            before, then = client.retrying(lambda: collect(client)), time.monotonic()
            # The flag, not only the exception: a Ctrl-C that lands in a finalizer is
            # dropped by Python, and the loop must stop all the same (producer.stopping).
            while not stop.wait(interval):
                status, now = client.retrying(lambda: collect(client)), time.monotonic()
                if stop.is_set():
                    break
                shown = with_rates(status, before, now - then)
                before, then = status, now
                if as_json:
                    out.write(json.dumps(shown) + "\n")
                else:
                    out.write(("\x1b[H\x1b[2J" if redraw else "\n") + render(shown) + "\n")
                out.flush()
        except KeyboardInterrupt:
            pass
