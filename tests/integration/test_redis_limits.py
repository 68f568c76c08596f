"""A Redis that refuses writes: the producer says so and enqueues nothing."""

from __future__ import annotations

import pytest
import redis
from PIL import Image

from batchery.local import RedisServer
from producer.client import Client
from producer.errors import QueueFullError
from producer.settings import Settings
from tests.factories import digit_paths, encode, noise_array

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


def test_a_new_producers_first_push_crosses_the_network_once() -> None:
    # Redis refuses a script it does not know yet (NOSCRIPT) and redis-py then sends the whole
    # call again: the ledger loads its script first, by itself.
    images = [encode(Image.fromarray(noise_array((96, 96, 3), seed=i))) for i in range(40)]
    with RedisServer() as server, Client(server.url) as client:
        r = redis.Redis.from_url(server.url)
        before = int(r.info("stats")["total_net_input_bytes"])
        client.submit_many(images)
        sent = int(r.info("stats")["total_net_input_bytes"]) - before
        base64_bytes = sum(len(i) for i in images) * 4 / 3
        assert base64_bytes < sent < 1.1 * base64_bytes, (sent, base64_bytes)
