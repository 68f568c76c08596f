"""Waiting for results in an asyncio server: every waiter on one subscriber connection.

Celery's Redis backend (and Batchery's workers) publish each result on its key's channel as
they store it. A gateway answering a thousand ``?wait=`` requests at once subscribes to
those thousand channels on one connection, and each request wakes when its message comes: no
polling loop, no connection or thread per waiting request. Subscriptions are group-committed
like pushes: the channels that requests arriving together need leave in one SUBSCRIBE, and
channels no one waits on any more in one UNSUBSCRIBE. Keys are read once subscribed (a
result stored just before is not missed; jobs pushed only after their subscription need no
read) and once a second while waiting (a writer that does not publish is still seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from producer.wire import result_key

log = logging.getLogger("batchery.gateway")


class ResultWaiter:
    """Waits for jobs' results on one shared subscriber connection."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._waiting: dict[bytes, set[asyncio.Future[Any]]] = {}
        self._subscribed: set[bytes] = set()
        self._next_round: asyncio.Future[None] | None = None
        self._syncing = False
        self._syncer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def wait(
        self, job_ids: Sequence[str], timeout: float,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> list[Any]:  # fmt: skip
        """Each job's stored result meta as soon as it is written, or None after ``timeout``.

        ``then``: run once subscribed, before waiting: the push of these very jobs, whose
        results can't exist before it (so no read is needed first).
        """
        loop = asyncio.get_running_loop()
        channels = [result_key(job_id).encode() for job_id in job_ids]
        futures: dict[bytes, asyncio.Future[Any]] = {}
        for channel in channels:
            futures[channel] = future = loop.create_future()
            self._waiting.setdefault(channel, set()).add(future)
        try:
            await self._sync()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())
            found: dict[bytes, Any] = {}
            if then is not None:
                await then()
            else:
                found = await self._read_keys(channels)
            deadline = loop.time() + timeout
            while len(found) < len(channels):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                waiting = [futures[c] for c in channels if c not in found]
                done, _ = await asyncio.wait(waiting, timeout=min(remaining, 1.0))
                for channel in channels:
                    if channel not in found and futures[channel].done():
                        found[channel] = futures[channel].result()
                if not done:
                    found.update(await self._read_keys([c for c in channels if c not in found]))
            return [found.get(channel) for channel in channels]
        finally:
            for channel, future in futures.items():
                waiters = self._waiting.get(channel)
                if waiters is not None:
                    waiters.discard(future)
                    if not waiters:
                        del self._waiting[channel]
            self._start_sync()  # unsubscribe what no one waits on, in the background

    async def _read_keys(self, channels: list[bytes]) -> dict[bytes, Any]:
        values = await self.redis.mget(channels) if channels else []
        return {c: v for c, v in zip(channels, values, strict=True) if v is not None}

    async def _sync(self) -> None:
        """Return once the subscriptions include every channel waited on now."""
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        round_done = self._next_round
        self._start_sync()
        await round_done

    def _start_sync(self) -> None:
        if not self._syncing:
            self._syncing = True
            self._syncer = asyncio.create_task(self._sync_rounds())  # held while it runs

    async def _sync_rounds(self) -> None:
        try:
            while True:
                wanted = set(self._waiting)
                add, drop = wanted - self._subscribed, self._subscribed - wanted
                round_done, self._next_round = self._next_round, None
                if not add and not drop:
                    if round_done is not None and not round_done.done():
                        round_done.set_result(None)
                    return
                try:
                    if drop:
                        await self._pubsub.unsubscribe(*drop)
                    if add:
                        await self._pubsub.subscribe(*add)
                except (redis.RedisError, OSError) as exc:
                    # Dropped from our books either way: the next round tries again.
                    self._subscribed -= drop | add
                    if round_done is not None and not round_done.done():
                        round_done.set_exception(exc)
                    if not add:
                        return
                    await asyncio.sleep(0.1)
                    continue
                self._subscribed = (self._subscribed - drop) | add
                if round_done is not None and not round_done.done():
                    round_done.set_result(None)
        finally:
            self._syncing = False
            if self._next_round is not None and not self._next_round.done():
                self._start_sync()  # someone asked while this round was finishing

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                # Waiters fall back to reading their keys once a second meanwhile.
                log.warning("result subscriber lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            except RuntimeError:  # not subscribed yet (no connection)
                await asyncio.sleep(0.05)
                continue
            if not message or message.get("type") != "message":
                continue
            for future in self._waiting.get(message["channel"], ()):
                if not future.done():
                    future.set_result(message["data"])

    async def close(self) -> None:
        """Stop reading (and any round of unsubscribing still going: it would use the
        connection being closed) and close the subscriber connection."""
        for task in (self._reader, self._syncer):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._pubsub.aclose()
