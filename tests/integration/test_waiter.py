"""The gateway's waiter against a real redis-server: woken by the result's publication, one
SUBSCRIBE for many requests arriving together."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from batchery.local import RedisServer
from gateway.waiter import ResultWaiter
from producer.wire import result_key

pytestmark = pytest.mark.integration
URL = ""


@pytest.fixture(autouse=True)
def _url(redis_server: RedisServer) -> None:
    global URL
    URL = redis_server.url


def waiter_and_writer() -> tuple[ResultWaiter, Any]:
    return ResultWaiter(aioredis.Redis.from_url(URL)), aioredis.Redis.from_url(URL)


def test_a_wait_is_answered_by_the_publication_not_the_re_read(monkeypatch) -> None:
    """With the once-a-second re-read of the keys disabled, a published result still wakes
    its waiter, at once."""

    async def never_read(self: ResultWaiter, channels: list[bytes]) -> dict[bytes, Any]:
        return {}

    monkeypatch.setattr(ResultWaiter, "_read_keys", never_read)

    async def scenario() -> tuple[list[Any], float]:
        waiter, writer = waiter_and_writer()
        loop = asyncio.get_running_loop()

        async def publish_soon() -> None:
            await asyncio.sleep(0.05)
            await writer.publish(result_key("job-1"), b'{"status": "SUCCESS"}')

        started = loop.time()
        publisher = asyncio.create_task(publish_soon())
        results = await waiter.wait(["job-1"], timeout=5.0, then=None)
        took = loop.time() - started
        await publisher
        await waiter.close()
        return results, took

    results, took = asyncio.run(scenario())
    assert results == [b'{"status": "SUCCESS"}']
    assert took < 0.9  # before the first one-second re-read would have come


def test_requests_arriving_together_share_one_subscribe(monkeypatch) -> None:
    calls: list[int] = []

    async def scenario() -> list[list[Any]]:
        waiter, writer = waiter_and_writer()
        subscribe = waiter._pubsub.subscribe

        async def counted(*channels: Any) -> Any:
            calls.append(len(channels))
            return await subscribe(*channels)

        monkeypatch.setattr(waiter._pubsub, "subscribe", counted)

        async def publish_all() -> None:
            await asyncio.sleep(0.1)
            for i in range(50):
                await writer.publish(result_key(f"job-{i}"), f"r{i}".encode())

        publisher = asyncio.create_task(publish_all())
        answers = await asyncio.gather(
            *(waiter.wait([f"job-{i}"], timeout=5.0, then=_nothing) for i in range(50))
        )
        await publisher
        await waiter.close()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[f"r{i}".encode()] for i in range(50)]
    assert calls == [50]  # fifty requests, one SUBSCRIBE of fifty channels


async def _nothing() -> None:
    return None
