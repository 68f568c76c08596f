"""Webhooks end to end: a real gateway, worker and redis-server, and a receiver on 127.0.0.1
that fails, is down, or comes back; deliveries survive a gateway killed mid-way."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from batchery.local import GatewayProcess, RedisServer, WorkerProcess, free_port
from producer.webhooks import verify
from producer.wire import (
    WEBHOOK_FAILED_KEY,
    WEBHOOK_GROUP,
    WEBHOOK_STREAM,
    decode_job_record,
    job_key,
    result_key,
)
from tests.factories import digit_paths, label_of

pytestmark = pytest.mark.integration

SECRET = "a-webhook-secret-for-tests"
PNG = {"Content-Type": "image/png"}
HOOKS = {"BATCHERY_WEBHOOK_SECRET": SECRET, "BATCHERY_WEBHOOK_ALLOW": "127.0.0.1",
         "BATCHERY_WEBHOOK_TIMEOUT_S": "2"}  # fmt: skip


class Receiver:
    """An HTTP server on 127.0.0.1 that records each delivery and fails the first ``fail``
    attempts at each job with a 500."""

    def __init__(self, port: int | None = None, fail: int = 0) -> None:
        self.port = port or free_port()
        self.fail = fail
        self.attempts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                job = self.headers["X-Batchery-Job"]
                with receiver.lock:
                    tries = sum(1 for a in receiver.attempts if a["job"] == job)
                    ok = tries >= receiver.fail
                    receiver.attempts.append({"job": job, "body": body, "ok": ok,
                                              "headers": dict(self.headers)})  # fmt: skip
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {a["job"]: a for a in self.attempts if a["ok"]}

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def submit(gateway: GatewayProcess, callback: str, n: int) -> list[str]:
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in digit_paths(n)]
    response = httpx.post(f"{gateway.url}/v1/jobs", files=files,
                          data={"callback_url": callback})  # fmt: skip
    assert response.status_code == 202, response.text
    return [job["job_id"] for job in response.json()["jobs"]]


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def hooks_gateway(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[GatewayProcess]:
    with GatewayProcess(redis_server.url, env=HOOKS) as proc:
        yield proc


def test_a_failing_receiver_gets_each_result_signed_after_retries(
    hooks_gateway: GatewayProcess,
) -> None:
    with Receiver(fail=2) as receiver:
        ids = submit(hooks_gateway, receiver.url, 5)
        wait_for(lambda: len(receiver.delivered()) == 5, 30, "5 deliveries")
        delivered = receiver.delivered()
        for job_id, path in zip(ids, digit_paths(5), strict=True):
            hit = delivered[job_id]
            assert verify(SECRET, hit["body"], hit["headers"]["X-Batchery-Signature"])
            assert not verify("another-secret-entirely", hit["body"],
                              hit["headers"]["X-Batchery-Signature"])  # fmt: skip
            result = json.loads(hit["body"])
            assert result["job_id"] == job_id and result["label"] == label_of(path)
            answer = httpx.get(f"{hooks_gateway.url}/v1/jobs/{job_id}").json()
            assert result == answer  # the same dict a poller reads
            tries = [a for a in receiver.attempts if a["job"] == job_id]
            assert [a["headers"]["X-Batchery-Attempt"] for a in tries] == ["1", "2", "3"]
            assert len({a["headers"]["X-Batchery-Delivery"] for a in tries}) == 1
    gaps = [float(a["headers"]["X-Batchery-Timestamp"]) for a in receiver.attempts]
    assert max(gaps) - min(gaps) >= 2  # backed off: 1 s, then 2 s


def test_deliveries_survive_a_gateway_killed_while_the_receiver_is_down(
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    r = redis.Redis.from_url(redis_server.url)
    port = free_port()  # nothing listens there yet: connections are refused
    first = GatewayProcess(redis_server.url, env=HOOKS).start()
    try:
        ids = submit(first, f"http://127.0.0.1:{port}/hook", 6)
        wait_for(lambda: all(r.exists(result_key(j)) for j in ids), 60, "the answers")
        # Each delivery has been tried and failed at least once, and waits in Redis.
        wait_for(lambda: int(r.xpending(WEBHOOK_STREAM, WEBHOOK_GROUP)["pending"]) >= 6, 30,
                 "failed attempts")  # fmt: skip
    finally:
        first.kill()
    with Receiver(port=port) as receiver, GatewayProcess(redis_server.url, env=HOOKS):
        started = time.monotonic()
        wait_for(lambda: set(ids) <= set(receiver.delivered()), 60, "redelivery")
        print(f"\n6 deliveries picked up by a new gateway {time.monotonic() - started:.1f} s "
              "after the old one was killed")  # fmt: skip
        for job_id in ids:
            hit = receiver.delivered()[job_id]
            assert verify(SECRET, hit["body"], hit["headers"]["X-Batchery-Signature"])
    assert all(decode_job_record(r.get(job_key(j)))[1] for j in ids)


def test_a_cancelled_job_is_delivered_too(redis_server: RedisServer) -> None:
    env = {**HOOKS, "BATCHERY_QUEUE": "hooks-unserved"}  # no worker: the job stays queued
    with Receiver() as receiver, GatewayProcess(redis_server.url, env=env) as gateway:
        (job_id,) = submit(gateway, receiver.url, 1)
        assert httpx.post(f"{gateway.url}/v1/jobs/{job_id}/cancel").status_code == 200
        wait_for(lambda: job_id in receiver.delivered(), 30, "the cancellation's delivery")
        assert json.loads(receiver.delivered()[job_id]["body"])["status"] == "CANCELLED"


def test_callbacks_outside_the_allow_list_are_refused(redis_server: RedisServer) -> None:
    env = {**HOOKS, "BATCHERY_WEBHOOK_ALLOW": "localhost,hooks.example.com"}
    with GatewayProcess(redis_server.url, env=env) as gateway:
        for url, why in [
            ("http://127.0.0.2:9/hook", "not in BATCHERY_WEBHOOK_ALLOW"),  # not listed
            ("http://10.0.0.1/hook", "not in BATCHERY_WEBHOOK_ALLOW"),
            ("http://evil.example.org/hook", "not in BATCHERY_WEBHOOK_ALLOW"),
            ("file:///etc/passwd", "http(s)"),
            ("http://user:pw@hooks.example.com/", "user name or password"),
        ]:
            response = httpx.post(f"{gateway.url}/v1/jobs", params={"callback_url": url},
                                  content=digit_paths(1)[0].read_bytes(), headers=PNG)  # fmt: skip
            assert response.status_code == 400, url
            assert why in response.json()["error"], (url, response.text)


def test_a_listed_name_that_resolves_to_loopback_is_not_called(
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    # The name is allowed, but it points inside: only listed addresses are, so the delivery
    # is given up and recorded, and the receiver never hears of it.
    env = {**HOOKS, "BATCHERY_WEBHOOK_ALLOW": "localhost"}
    r = redis.Redis.from_url(redis_server.url)
    with Receiver() as receiver, GatewayProcess(redis_server.url, env=env) as gateway:
        (job_id,) = submit(gateway, f"http://localhost:{receiver.port}/hook", 1)

        def recorded() -> bool:
            return any(json.loads(raw)["job_id"] == job_id
                       for raw in r.lrange(WEBHOOK_FAILED_KEY, 0, -1))  # fmt: skip

        wait_for(recorded, 30, "the refusal to be recorded")
        assert receiver.attempts == []
        failed = [json.loads(raw) for raw in r.lrange(WEBHOOK_FAILED_KEY, 0, -1)]
        reason = next(f["reason"] for f in failed if f["job_id"] == job_id)
        assert "127.0.0.1" in reason and "does not list" in reason


def test_each_attempts_outcome_is_counted_in_the_gateways_metrics(
    redis_server: RedisServer,
) -> None:
    # No worker: cancelling answers the jobs. One receiver fails its first attempt, the other
    # every attempt, past a retry time of 2.5 s: retried at once and at ~1 s, given up at ~3 s.
    env = {**HOOKS, "BATCHERY_QUEUE": "hooks-metrics", "BATCHERY_WEBHOOK_RETRY_S": "2.5"}
    with Receiver(fail=1) as flaky, Receiver(fail=100) as down, \
            GatewayProcess(redis_server.url, env=env) as gateway:  # fmt: skip
        (delivered,) = submit(gateway, flaky.url, 1)
        (given_up,) = submit(gateway, down.url, 1)
        for job_id in (delivered, given_up):
            assert httpx.post(f"{gateway.url}/v1/jobs/{job_id}/cancel").status_code == 200

        def counted() -> dict[str, float]:
            text = httpx.get(f"{gateway.url}/metrics").text
            return {
                sample.labels["outcome"]: sample.value
                for family in text_string_to_metric_families(text)
                if family.name == "batchery_webhook_deliveries"
                for sample in family.samples if sample.name.endswith("_total")
            }  # fmt: skip

        wait_for(lambda: counted().get("given_up") == 1, 15, "the delivery to be given up")
        assert counted() == {"retry": 3.0, "delivered": 1.0, "given_up": 1.0}
        assert [a["ok"] for a in flaky.attempts] == [False, True]
        assert len(down.attempts) == 2  # the third was given up, not sent
