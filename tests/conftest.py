from __future__ import annotations

import fakeredis
import pytest

from producer.client import Client
from producer.settings import Settings


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url="redis://:s3cret@localhost:6379/0", chunk_size=64)


@pytest.fixture
def client(settings: Settings, fake_redis: fakeredis.FakeRedis) -> Client:
    return Client(settings=settings, redis_client=fake_redis)
