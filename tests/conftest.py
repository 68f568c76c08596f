from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest

from producer.client import Client
from producer.registry import Registry
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url="redis://:s3cret@localhost:6379/0", chunk_size=64)


@pytest.fixture
def client(settings: Settings, fake_redis: fakeredis.FakeRedis) -> Client:
    return Client(settings=settings, redis_client=fake_redis)


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    """The shipped model, loaded once a module (imports TensorFlow: worker-side tests only)."""
    from worker.models import ModelCache

    cache = ModelCache(Registry(ROOT / "models"), "mnist-cnn", batch_size=16, threads=1)
    cache.get(None, None)
    return cache
