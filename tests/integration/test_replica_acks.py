"""BATCHERY_REPLICA_ACKS: a write no replica confirms is reported, never passed off as safe.

Against a real redis-server with no replica (WAIT counts 0): the Client's push raises
ReplicaAckError, the gateway answers 503, and a worker gives its batch back rather than
acknowledging it; once a replica joins, the same batch is confirmed and its message settled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from batchery.local import GatewayProcess, RedisServer, WorkerProcess
from producer.client import Client
from producer.errors import ReplicaAckError
from producer.settings import Settings
from producer.wire import UNACKED_KEY, ledger_key, queue_key
from tests.factories import digit_paths

pytestmark = pytest.mark.integration

ACKS = {"BATCHERY_REPLICA_ACKS": "1", "BATCHERY_REPLICA_ACK_TIMEOUT": "0.2"}


@pytest.fixture
def lone() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_push_no_replica_confirms_raises(lone: RedisServer) -> None:
    settings = Settings.from_env({"BATCHERY_REDIS_URL": lone.url, **ACKS})
    with Client(settings=settings) as client:
        started = time.monotonic()
        with pytest.raises(ReplicaAckError, match="0 of the 1 replicas") as caught:
            client.submit(digit_paths(1)[0])
        assert 0.2 <= time.monotonic() - started < 2.0  # WAIT's timeout, not a hang
        assert "on the primary" in str(caught.value)
        # It is on the primary, as the message says: nothing is hidden or undone.
        assert client.redis.llen(queue_key("batchery", "normal")) == 1


def test_the_gateway_answers_503_when_no_replica_confirms(lone: RedisServer) -> None:
    with GatewayProcess(lone.url, env=ACKS) as gateway:
        response = httpx.post(f"{gateway.url}/v1/jobs", content=digit_paths(1)[0].read_bytes(),
                              headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "replicas" in response.json()["error"]


def test_a_worker_acks_a_batch_only_once_a_replica_holds_its_results(lone: RedisServer) -> None:
    env = {**ACKS, "BATCHERY_QUEUE": "acks"}
    r = redis.Redis.from_url(lone.url)
    with Client(settings=Settings(redis_url=lone.url, queue="acks")) as client, \
            WorkerProcess(lone.url, "--concurrency", "1", env=env) as worker:  # fmt: skip
        job = client.submit(digit_paths(1)[0])
        # The result is written on the primary, but the batch is not acknowledged: its
        # message stays held (kombu's unacked) or is given back to the queue to run again.
        assert client.result(job, timeout=240)["status"] == "SUCCESS"
        deadline = time.monotonic() + 30
        while "ReplicaAckError" not in worker.log_path.read_text():
            worker.check_alive()
            assert time.monotonic() < deadline, "the worker did not report the missing acks"
            time.sleep(0.2)
        assert r.hlen(UNACKED_KEY) + r.llen(queue_key("acks", "normal")) == 1
        with RedisServer(args=("--replicaof", "127.0.0.1", str(lone.port))):
            deadline = time.monotonic() + 60
            while r.hlen(ledger_key("acks")) or r.hlen(UNACKED_KEY) or r.llen(
                queue_key("acks", "normal")
            ):  # fmt: skip
                worker.check_alive()
                assert time.monotonic() < deadline, "the batch was not settled once replicated"
                time.sleep(0.2)
        assert client.result(job)["status"] == "SUCCESS"
