"""A real redis-server on a free port and a real `batchery worker` process, shared per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.settings import Settings
from tests.factories import wait_until_serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def worker(redis_server: RedisServer) -> Iterator[WorkerProcess]:
    """Two pool processes, batches of up to 32 gathered for up to 20 ms."""
    with WorkerProcess(
        redis_server.url, "--concurrency", "2", "--batch-size", "32", "--batch-wait-ms", "20"
    ) as proc:
        with Client(settings=Settings(redis_url=redis_server.url)) as client:
            wait_until_serving(client, proc)
        yield proc


@pytest.fixture
def client(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[Client]:
    with Client(settings=Settings(redis_url=redis_server.url)) as c:
        yield c
