"""A Redis that refuses writes: the producer says so and enqueues nothing."""

from __future__ import annotations

import pytest
import redis

from producer.client import Client
from producer.errors import QueueFullError
from producer.local import RedisServer
from producer.settings import Settings
from tests.factories import digit_paths

pytestmark = pytest.mark.integration


def test_maxmemory_with_noeviction_is_a_clear_error_and_nothing_half_enqueued() -> None:
    with RedisServer(args=("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")) as server:
        r = redis.Redis.from_url(server.url)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for i in range(10_000):  # fill it up
                r.set(f"ballast:{i}", b"x" * 10_000)
        client = Client(settings=Settings(redis_url=server.url, chunk_size=16))
        with pytest.raises(QueueFullError, match=r"out of memory.*nothing was enqueued"):
            client.submit_many(digit_paths() * 3)
        assert r.llen("batchery") == 0
        client.close()
