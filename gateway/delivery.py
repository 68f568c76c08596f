"""Webhook delivery: every gateway runs a :class:`Deliverer`, one consumer of the deliveries'
group, signing each POST with ``producer.webhooks.sign`` and calling only what
``producer.webhooks.WebhookPolicy`` allows, at the address it checked. The path of one
delivery, and what a receiver sees, are in ``producer.webhooks``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis

from producer.errors import WebhookRefusedError, WireError
from producer.settings import Settings
from producer.webhooks import SIGNATURE_HEADER, WebhookPolicy, sign
from producer.wire import (
    STATS_KEY,
    WEBHOOK_FAILED_KEY,
    WEBHOOK_GROUP,
    WEBHOOK_STREAM,
    bounded,
    decode_result_meta,
    excerpt,
    result_key,
)

log = logging.getLogger("batchery.webhooks")

#: The longest pause between two attempts at one delivery.
MAX_BACKOFF_S = 300.0
#: Deliveries given up on that are kept for inspection (``batchery status``).
FAILED_KEPT = 1000


def backoff(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: 1, 2, 4, ... at most 5 min."""
    return min(2.0 ** max(0, attempts - 1), MAX_BACKOFF_S)


class Deliverer:
    """One gateway's webhook delivery: a consumer of the deliveries' group (see the module).

    ``on_outcome(outcome)`` is called with ``delivered``, ``retry`` or ``given_up`` after
    each attempt (the gateway counts them in its metrics).
    """

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        concurrency: int = 32,
    ) -> None:
        if not settings.webhook_secret:
            raise WebhookRefusedError("webhook delivery needs BATCHERY_WEBHOOK_SECRET")
        self.settings = settings
        self.secret = settings.webhook_secret
        self.redis = client
        self.policy = WebhookPolicy.from_settings(settings)
        self.on_outcome = on_outcome
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = asyncio.Semaphore(concurrency)
        self._mine: set[str] = set()  # entries this process is delivering right now
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; Redis outages are waited out."""
        import httpx

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False,
            trust_env=False, limits=limits,
        ) as http:  # fmt: skip
            self._http = http
            reclaim = asyncio.create_task(self._reclaim_forever(stop))
            try:
                while not stop.is_set():
                    try:
                        await self._read_new()
                    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                        log.warning("webhooks: Redis unreachable (%s); retrying in 1 s", exc)
                        await asyncio.sleep(1.0)
            finally:
                reclaim.cancel()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(reclaim, *self._tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(WEBHOOK_STREAM, WEBHOOK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_new(self) -> None:
        await self._ensure_group()
        while True:
            await self._slots.acquire()  # read no more than can be delivered at once
            self._slots.release()
            reply: Any = await self.redis.xreadgroup(
                WEBHOOK_GROUP, self.name, {WEBHOOK_STREAM: ">"}, count=32, block=1000
            )
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(entry_id, fields, 1)
            if not reply:
                return  # back to the loop: the stop flag is checked once a second

    def _start(self, entry_id: Any, fields: dict[Any, Any] | None, attempt: int) -> None:
        key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if key in self._mine:
            return
        self._mine.add(key)
        task = asyncio.create_task(self._deliver(key, fields or {}, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reclaim_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._reclaim()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # the reader logs it
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            await asyncio.sleep(0.5)

    async def _reclaim(self) -> None:
        """Claim pending entries whose backoff has passed: this process's failed attempts,
        and any consumer's entries idle longer than an attempt can take (it died)."""
        stalled = self.settings.webhook_timeout_s + 2.0
        pending: Any = await self.redis.xpending_range(
            WEBHOOK_STREAM, WEBHOOK_GROUP, min="-", max="+", count=256, idle=1000
        )
        for entry in pending:
            entry_id = entry["message_id"]
            key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if key in self._mine:
                continue
            owner = entry["consumer"]
            owner = owner.decode() if isinstance(owner, bytes) else str(owner)
            wait = backoff(int(entry["times_delivered"]))
            if owner != self.name:
                wait = max(wait, stalled)
            if entry["time_since_delivered"] < wait * 1000:
                continue
            claimed: Any = await self.redis.xclaim(
                WEBHOOK_STREAM, WEBHOOK_GROUP, self.name, int(wait * 1000), [entry_id]
            )
            for claimed_id, fields in claimed:
                self._start(claimed_id, fields, int(entry["times_delivered"]) + 1)

    async def _deliver(self, entry_id: str, fields: dict[Any, Any], attempt: int) -> None:
        async with self._slots:
            try:
                outcome = await self._attempt(entry_id, fields, attempt)
            except (redis.ConnectionError, redis.TimeoutError):
                outcome = "retry"  # left pending: claimed again once Redis is back
            finally:
                self._mine.discard(entry_id)
        self.on_outcome(outcome)

    async def _attempt(self, entry_id: str, fields: dict[Any, Any], attempt: int) -> str:
        job = _text(fields.get(b"job", fields.get("job")))
        url = _text(fields.get(b"url", fields.get("url")))
        answered_at = int(entry_id.split("-", 1)[0]) / 1000
        if time.time() - answered_at > self.settings.webhook_retry_s:
            await self._give_up(entry_id, job, url, "retried for BATCHERY_WEBHOOK_RETRY_S")
            return "given_up"
        raw = await self.redis.get(result_key(job)) if job else None
        try:
            body = json.dumps(decode_result_meta(raw)).encode() if raw is not None else None
        except WireError:
            body = None
        if body is None:
            await self._give_up(entry_id, job, url, "the job's result is gone (expired)")
            return "given_up"
        try:
            host, port, address = await self.policy.resolve(url)
        except WebhookRefusedError as exc:
            await self._give_up(entry_id, job, url, str(exc))
            return "given_up"
        except ConnectionError as exc:
            log.info("webhook for job %s: %s (attempt %d)", job, exc, attempt)
            return "retry"
        error = await self._post(url, host, port, address, body, job, entry_id, attempt)
        if error is not None:
            log.info("webhook for job %s to %s failed (attempt %d): %s; next in %g s",
                     job, excerpt(url, 80), attempt, error, backoff(attempt))  # fmt: skip
            return "retry"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(WEBHOOK_STREAM, WEBHOOK_GROUP, entry_id)
            pipe.xdel(WEBHOOK_STREAM, entry_id)
            pipe.hincrby(STATS_KEY, "webhooks_delivered", 1)
            await pipe.execute()
        return "delivered"

    async def _post(
        self, url: str, host: str, port: int, address: str, body: bytes, job: str,
        entry_id: str, attempt: int,
    ) -> str | None:  # fmt: skip
        """POST to the checked address; None on a 2xx answer, else what went wrong."""
        import httpx

        timestamp = int(time.time())
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Batchery-Webhook/1",
            "Host": host if port == default_port else f"{host}:{port}",
            "X-Batchery-Job": job,
            "X-Batchery-Delivery": entry_id,
            "X-Batchery-Attempt": str(attempt),
            "X-Batchery-Timestamp": str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        target = httpx.URL(url).copy_with(host=address, port=port)
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            response = await self._http.post(target, content=body, headers=headers,
                                             extensions=extensions)  # fmt: skip
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _give_up(self, entry_id: str, job: str, url: str, reason: str) -> None:
        log.warning("webhook for job %s to %s given up: %s", job, excerpt(url, 80), reason)
        record = json.dumps({"job_id": job, "url": url, "reason": bounded(reason),
                             "at": time.time()})  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(WEBHOOK_STREAM, WEBHOOK_GROUP, entry_id)
            pipe.xdel(WEBHOOK_STREAM, entry_id)
            pipe.lpush(WEBHOOK_FAILED_KEY, record)
            pipe.ltrim(WEBHOOK_FAILED_KEY, 0, FAILED_KEPT - 1)
            pipe.hincrby(STATS_KEY, "webhooks_failed", 1)
            await pipe.execute()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
