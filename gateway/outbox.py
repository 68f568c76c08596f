"""The gateway's push: jobs from concurrent requests leave together, without a thread hop.

The asyncio twin of ``Client.enqueue``'s group commit. While one push is on the wire, the
jobs of requests arriving meanwhile wait, then leave together in the next push, packed into
shared messages: a thousand concurrent requests cost Redis a few pushes, not a thousand.
Each push is the ledger's one script: the jobs' records (their owner, their callback) and
their messages, all or nothing, in one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from producer.connections import ReplicaAcks
from producer.errors import QueueFullError, RedisUnavailableError
from producer.ledger import PUSH_SCRIPT, push_command
from producer.settings import Settings, redact_url
from producer.signing import Signer
from producer.wire import Job, build_message, chunk_jobs

Records = Mapping[str, str]


class Outbox:
    """Group-committed pushes from one event loop (see the module)."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._signer = Signer.from_settings(settings)
        self._script = client.register_script(PUSH_SCRIPT)
        self._acks = ReplicaAcks.from_settings(settings)
        self._waiting: list[tuple[Sequence[Job], Records, asyncio.Future[None]]] = []
        self._pushing = False
        self._task: asyncio.Task[None] | None = None

    async def enqueue(self, jobs: Sequence[Job], records: Records) -> None:
        """Push checked jobs and their records, with whatever else is waiting to leave.

        :class:`QueueFullError` at once if the queue is at BATCHERY_MAX_QUEUE (an HTTP
        caller retries later; it is not kept waiting), :class:`RedisUnavailableError` if
        Redis can't be reached within BATCHERY_CONNECT_RETRY (at most 2 s).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((jobs, records, future))
        if not self._pushing:
            self._pushing = True
            self._task = asyncio.create_task(self._drain())  # held: a task must be referenced
        await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    await self._push([job for jobs, _, _ in group for job in jobs],
                                     {k: v for _, records, _ in group
                                      for k, v in records.items()})  # fmt: skip
                except Exception as exc:
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, _, future in group:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._pushing = False

    async def _push(self, jobs: list[Job], records: dict[str, str]) -> None:
        settings = self.settings
        messages = [
            build_message(chunk, settings.queue, signer=self._signer)
            for chunk in chunk_jobs(jobs, settings.chunk_size, settings.max_message_bytes)
        ]
        keys, args = push_command(settings.queue, messages, settings.visibility_timeout_s,
                                  settings.max_queue, records, settings.result_ttl_s)  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(settings.connect_retry_s, 2.0)
        pause = 0.05
        while True:
            try:
                pushed = await self._run(keys, args)
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if loop.time() >= deadline:
                    raise RedisUnavailableError(
                        f"cannot reach Redis at {redact_url(settings.redis_url)}: {exc}"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)
            except redis.ResponseError as exc:
                if "OOM" in str(exc):
                    raise QueueFullError(
                        f"Redis at {redact_url(settings.redis_url)} is out of memory and "
                        "refused the write: nothing was enqueued"
                    ) from exc
                raise
        if pushed < 0:
            raise QueueFullError(
                f"queue {settings.queue!r} is full (BATCHERY_MAX_QUEUE={settings.max_queue} "
                "messages): nothing was enqueued"
            )

    async def _run(self, keys: list[str], args: list[Any]) -> int:
        """The push script, then (with replica acks) WAIT on the same connection."""
        if not self._acks.replicas:
            return int(await self._script(keys=keys, args=args))
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._script(keys=keys, args=args, client=pipe)
            self._acks.add(pipe)
            replies = await pipe.execute()
        if int(replies[0]) >= 0:
            self._acks.check(replies, f"{int(replies[0])} messages pushed")
        return int(replies[0])
