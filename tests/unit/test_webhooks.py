"""Webhooks on fakeredis: the signature, who may be called, the delivery queued in the same
script that stores an answer; and a gateway's Deliverer against receivers on 127.0.0.1
(redirects not followed, the checked address pinned), and with a fake clock (the doubling
backoff, giving up after BATCHERY_WEBHOOK_RETRY_S, the last 1,000 failures kept)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakeredis
import pytest

from gateway.delivery import Deliverer, backoff
from producer.client import Client
from producer.errors import InvalidJobError, WebhookRefusedError
from producer.settings import Settings
from producer.webhooks import WebhookPolicy, sign, verify
from producer.wire import (
    STATS_KEY,
    WEBHOOK_FAILED_KEY,
    WEBHOOK_GROUP,
    WEBHOOK_STREAM,
    JobResult,
    check_callback_url,
    decode_job_record,
    job_key,
    queue_key,
)
from tests.factories import digit_paths
from worker.tasks import store_results

SECRET = "sixteen-chars-or-more"
DIGIT = digit_paths(1)[0].read_bytes()


def test_a_signature_verifies_and_anything_changed_does_not() -> None:
    now = int(time.time())
    body = b'{"job_id": "j", "status": "SUCCESS"}'
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=")
    assert verify(SECRET, body, header)
    assert not verify(SECRET, body + b" ", header)
    assert not verify("another-secret-entirely", body, header)
    assert not verify(SECRET, body, header.replace(f"t={now}", f"t={now + 1}"))
    assert not verify(SECRET, body, sign(SECRET, now - 3600, body))  # replayed an hour later
    assert not verify(SECRET, body, "garbage")


@pytest.mark.parametrize(
    ("allow", "url", "allowed"),
    [
        ("hooks.example.com", "https://hooks.example.com/x", True),
        ("hooks.example.com", "https://HOOKS.example.com./x", True),
        ("hooks.example.com", "https://evil.example.com/x", False),
        ("hooks.example.com", "https://hooks.example.com.evil.org/x", False),
        ("*.example.com", "https://a.b.example.com/x", True),
        ("*.example.com", "https://example.com/x", False),
        ("*.example.com", "https://notexample.com/x", False),
        ("*", "https://anything.example.org/x", True),
        ("*", "http://127.0.0.1/x", False),  # * is any public name, never an inside address
        ("*", "http://[::1]/x", False),
        ("*", "http://[::ffff:127.0.0.1]/x", False),
        ("*", "http://169.254.169.254/latest/meta-data", False),  # the cloud metadata service
        ("*", "http://10.1.2.3/x", False),
        ("*", "http://8.8.8.8/x", True),
        ("127.0.0.1", "http://127.0.0.1:9000/x", True),
        ("127.0.0.1", "http://127.0.0.2/x", False),
        ("10.0.0.0/8", "http://10.1.2.3/x", True),
        ("", "https://hooks.example.com/x", False),  # webhooks off
    ],
)
def test_the_allow_list(allow: str, url: str, allowed: bool) -> None:
    policy = WebhookPolicy.parse(allow.split(",") if allow else [])
    if allowed:
        policy.check_url(url)
    else:
        with pytest.raises(WebhookRefusedError):
            policy.check_url(url)


def test_a_name_that_resolves_inside_is_refused_at_delivery() -> None:
    # "localhost" passes the name check; it resolves to loopback, which is not listed.
    policy = WebhookPolicy.parse(["localhost"])
    policy.check_url("http://localhost:8080/x")
    with pytest.raises(WebhookRefusedError, match="does not list"):
        asyncio.run(policy.resolve("http://localhost:8080/x"))
    listed = WebhookPolicy.parse(["localhost", "127.0.0.1", "::1"])
    assert asyncio.run(listed.resolve("http://localhost:8080/x"))[2] in ("127.0.0.1", "::1")


def test_a_decimal_address_is_resolved_and_checked_as_an_address() -> None:
    # 2130706433 is 127.0.0.1 to inet_aton: a name check alone would let it through.
    with pytest.raises(WebhookRefusedError):
        asyncio.run(WebhookPolicy.parse(["*"]).resolve("http://2130706433/x"))


def test_a_bad_allow_entry_is_named() -> None:
    with pytest.raises(WebhookRefusedError, match="not a host name"):
        WebhookPolicy.parse(["hooks.example.com/path"])


@pytest.mark.parametrize(
    "url",
    ["ftp://h/x", "http:///x", "http://u:p@h/x", "http://h/ x", "http://h/\n", "x" * 3000,
     "http://h:99999/", "http://h:0/", 42, ""],
)  # fmt: skip
def test_a_callback_url_of_the_wrong_form_is_refused(url: object) -> None:
    with pytest.raises(InvalidJobError):
        check_callback_url(url)


def test_backoff_doubles_to_five_minutes() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(30) == 300


def hooked_client(fake: fakeredis.FakeRedis, allow: tuple[str, ...] = ("127.0.0.1",)) -> Client:
    return Client(settings=Settings(webhook_allow=allow, webhook_secret=SECRET),
                  redis_client=fake)  # fmt: skip


def test_an_answer_queues_its_delivery_in_the_same_script() -> None:
    fake = fakeredis.FakeRedis()
    client = hooked_client(fake)
    hooked = client.submit(DIGIT, callback_url="http://127.0.0.1:9/hook")
    plain = client.submit(DIGIT)
    assert decode_job_record(fake.get(job_key(hooked))) == (None, "http://127.0.0.1:9/hook")
    assert fake.exists(job_key(plain))  # known, though it has no callback
    assert fake.xlen(WEBHOOK_STREAM) == 0
    store_results(fake, "batchery", [JobResult(hooked, "SUCCESS"), JobResult(plain, "SUCCESS")],
                  60)  # fmt: skip
    entries = fake.xrange(WEBHOOK_STREAM)
    assert [(e[1][b"job"], e[1][b"url"]) for e in entries] == [
        (hooked.encode(), b"http://127.0.0.1:9/hook")
    ]
    # A second answer (computed twice) is discarded, and queues nothing more.
    store_results(fake, "batchery", [JobResult(hooked, "SUCCESS")], 60)
    assert fake.xlen(WEBHOOK_STREAM) == 1


def test_a_cancellation_queues_its_delivery() -> None:
    fake = fakeredis.FakeRedis()
    client = hooked_client(fake)
    job = client.submit(DIGIT, callback_url="http://127.0.0.1:9/hook")
    assert client.cancel(job)
    assert fake.xlen(WEBHOOK_STREAM) == 1
    assert not client.cancel(job)  # already answered: nothing more queued
    assert fake.xlen(WEBHOOK_STREAM) == 1


def test_a_callback_not_allowed_is_refused_before_anything_is_enqueued() -> None:
    fake = fakeredis.FakeRedis()
    for client, url in [(hooked_client(fake, ()), "http://127.0.0.1:9/"),
                        (hooked_client(fake), "http://10.0.0.1/")]:  # fmt: skip
        with pytest.raises(WebhookRefusedError):
            client.submit(DIGIT, callback_url=url)
    assert fake.llen(queue_key("batchery", "normal")) == 0
    assert not list(fake.scan_iter("batchery:job:*"))


# --- deliveries as a gateway makes them: a Deliverer on fakeredis, receivers on 127.0.0.1 ---


class Receiver:
    """An HTTP server on ``host``: records every request, of any method, and answers each
    with ``status`` and ``headers``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, status: int = 200,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.hits: list[dict[str, Any]] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                hits.append({"method": self.command, "headers": dict(self.headers),
                             "body": self.rfile.read(length)})  # fmt: skip
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.host, self.port = host, int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def answered_with_callback(server: fakeredis.FakeServer, url: str, allow: tuple[str, ...]) -> str:
    """A job submitted with ``url`` as its callback, then answered: its delivery is queued."""
    fake = fakeredis.FakeRedis(server=server)
    job = hooked_client(fake, allow).submit(DIGIT, callback_url=url)
    store_results(fake, "batchery", [JobResult(job, "SUCCESS", label="7")], 7200)
    assert fake.xlen(WEBHOOK_STREAM) == 1
    return job


def deliver_until(settings: Settings, server: fakeredis.FakeServer,
                  done: Callable[[list[str]], bool], timeout: float = 10) -> list[str]:  # fmt: skip
    """Run a Deliverer as a gateway runs it (its own HTTP client) until ``done(outcomes)``."""

    async def run() -> list[str]:
        outcomes: list[str] = []
        deliverer = Deliverer(settings, fakeredis.FakeAsyncRedis(server=server), outcomes.append)
        stop = asyncio.Event()
        running = asyncio.create_task(deliverer.run(stop))
        deadline = time.monotonic() + timeout
        while not done(outcomes):
            assert time.monotonic() < deadline, f"timed out; outcomes so far: {outcomes}"
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(running, 5)
        return outcomes

    return asyncio.run(run())


@pytest.mark.parametrize("status", [302, 307])  # followed as a GET, and as the same POST
def test_a_redirect_is_not_followed_and_the_delivery_stays_pending(status: int) -> None:
    server = fakeredis.FakeServer()
    elsewhere = Receiver()
    redirecting = Receiver(status=status, headers={"Location": elsewhere.url()})
    with elsewhere, redirecting:
        job = answered_with_callback(server, redirecting.url(), ("127.0.0.1",))
        settings = Settings(webhook_allow=("127.0.0.1",), webhook_secret=SECRET)
        outcomes = deliver_until(settings, server, bool)
    assert outcomes == ["retry"]  # a 3xx is not a 2xx: not delivered, tried again later
    assert [hit["headers"]["X-Batchery-Job"] for hit in redirecting.hits] == [job]
    assert elsewhere.hits == []  # its Location was never called, with any method
    fake = fakeredis.FakeRedis(server=server)
    assert fake.xpending(WEBHOOK_STREAM, WEBHOOK_GROUP)["pending"] == 1
    assert fake.hget(STATS_KEY, "webhooks_delivered") is None


def two_receivers_on_one_port() -> tuple[Receiver, Receiver]:
    """Receivers on 127.0.0.1 and 127.0.0.2 with the same port: where a name could point."""
    for _ in range(20):
        first = Receiver("127.0.0.1")
        try:
            return first, Receiver("127.0.0.2", first.port)
        except OSError:
            first.server.server_close()
    raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")


def test_a_name_rebound_after_its_check_is_still_delivered_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # hooks.test resolves to 127.0.0.1 when the delivery checks it, then to 127.0.0.2 (also
    # allowed: only the pinning, not a second check, can keep the delivery where it was
    # checked). A connection made by name would look it up again and reach the other one.
    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name != "hooks.test":
            return real(host, port, *args, **kwargs)
        lookups.append(name)
        return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.2", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    allow = ("hooks.test", "127.0.0.0/8")
    server = fakeredis.FakeServer()
    checked, rebound = two_receivers_on_one_port()
    with checked, rebound:
        job = answered_with_callback(server, f"http://hooks.test:{checked.port}/hook", allow)
        settings = Settings(webhook_allow=allow, webhook_secret=SECRET)
        outcomes = deliver_until(settings, server, bool)
    assert outcomes == ["delivered"]
    assert lookups == ["hooks.test"]  # looked up once, to check it; never again to connect
    assert rebound.hits == []
    [hit] = checked.hits
    assert hit["headers"]["Host"] == f"hooks.test:{checked.port}"  # the name, at the address
    assert hit["headers"]["X-Batchery-Job"] == job
    assert verify(SECRET, hit["body"], hit["headers"]["X-Batchery-Signature"])


class Clock:
    """``time.time`` under the test's control: Redis's idle times, entry ids and the
    deliverer's retry age all read it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def failing_deliverer(
    settings: Settings, server: fakeredis.FakeServer, outcomes: list[str]
) -> tuple[Deliverer, list[tuple[float, int]]]:
    """A Deliverer whose every POST fails (HTTP 500): the time and number of each attempt."""
    attempts: list[tuple[float, int]] = []
    deliverer = Deliverer(settings, fakeredis.FakeAsyncRedis(server=server), outcomes.append)

    async def refused(url: str, host: str, port: int, address: str, body: bytes, job: str,
                      entry_id: str, attempt: int) -> str:  # fmt: skip
        attempts.append((time.time(), attempt))
        return "HTTP 500"

    deliverer._post = refused  # type: ignore[method-assign]
    return deliverer, attempts


async def settled(deliverer: Deliverer) -> None:
    """Wait for the attempts the deliverer started."""
    await asyncio.gather(*list(deliverer._tasks))


def test_attempts_back_off_doubling_from_one_second_to_five_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    server = fakeredis.FakeServer()
    answered_with_callback(server, "http://127.0.0.1:9/hook", ("127.0.0.1",))
    settings = Settings(webhook_allow=("127.0.0.1",), webhook_secret=SECRET)
    outcomes: list[str] = []
    deliverer, attempts = failing_deliverer(settings, server, outcomes)
    # The pauses docs/http.md promises: 1 s, 2 s, 4 s, ... at most 5 minutes apart.
    pauses = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]

    async def run() -> None:
        await deliverer._read_new()  # the first attempt, as soon as it is read
        await settled(deliverer)
        assert [n for _, n in attempts] == [1]
        for number, pause in enumerate(pauses, 2):
            last = attempts[-1][0]
            clock.now = last + pause - 0.01
            await deliverer._reclaim()
            await settled(deliverer)
            assert len(attempts) == number - 1, f"attempt {number} came before {pause} s"
            clock.now = last + pause + 0.002
            await deliverer._reclaim()
            await settled(deliverer)
            assert len(attempts) == number, f"attempt {number} did not come after {pause} s"
            assert attempts[-1][1] == number

    asyncio.run(run())
    gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(attempts)]
    assert gaps == [p + 0.002 for p in pauses]
    assert outcomes == ["retry"] * len(attempts)


def test_a_delivery_is_given_up_once_retry_s_has_passed_since_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    server = fakeredis.FakeServer()
    job = answered_with_callback(server, "http://127.0.0.1:9/hook", ("127.0.0.1",))
    answered_at = clock.now
    settings = Settings(webhook_allow=("127.0.0.1",), webhook_secret=SECRET, webhook_retry_s=60)
    outcomes: list[str] = []
    deliverer, attempts = failing_deliverer(settings, server, outcomes)
    fake = fakeredis.FakeRedis(server=server)

    async def run() -> None:
        await deliverer._read_new()
        await settled(deliverer)
        [entry] = fake.xpending_range(WEBHOOK_STREAM, WEBHOOK_GROUP, "-", "+", 10)
        entry_id, fields = entry["message_id"].decode(), fake.xrange(WEBHOOK_STREAM)[0][1]
        clock.now = answered_at + 60  # still within BATCHERY_WEBHOOK_RETRY_S: tried
        assert await deliverer._attempt(entry_id, fields, 2) == "retry"
        clock.now = answered_at + 60.002  # past it: given up, the receiver not called
        assert await deliverer._attempt(entry_id, fields, 3) == "given_up"

    asyncio.run(run())
    assert [n for _, n in attempts] == [1, 2]
    [record] = [json.loads(raw) for raw in fake.lrange(WEBHOOK_FAILED_KEY, 0, -1)]
    assert record["job_id"] == job and record["url"] == "http://127.0.0.1:9/hook"
    assert "BATCHERY_WEBHOOK_RETRY_S" in record["reason"]
    assert fake.xlen(WEBHOOK_STREAM) == 0  # acknowledged and removed: never tried again
    assert fake.xpending(WEBHOOK_STREAM, WEBHOOK_GROUP)["pending"] == 0
    assert int(fake.hget(STATS_KEY, "webhooks_failed")) == 1


def test_only_the_last_thousand_given_up_deliveries_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "time", clock)
    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    for i in range(1005):
        fake.xadd(WEBHOOK_STREAM, {"job": f"job-{i}", "url": "http://127.0.0.1:9/hook"})
    clock.now += 3600.001  # past BATCHERY_WEBHOOK_RETRY_S's default hour
    settings = Settings(webhook_allow=("127.0.0.1",), webhook_secret=SECRET)
    deliverer = Deliverer(settings, fakeredis.FakeAsyncRedis(server=server))

    async def run() -> None:
        for entry_id, fields in fake.xrange(WEBHOOK_STREAM):
            assert await deliverer._attempt(entry_id.decode(), fields, 9) == "given_up"

    asyncio.run(run())
    kept = [json.loads(raw)["job_id"] for raw in fake.lrange(WEBHOOK_FAILED_KEY, 0, -1)]
    assert len(kept) == 1000  # FAILED_KEPT, exactly
    assert kept == [f"job-{i}" for i in range(1004, 4, -1)]  # the newest first; 0-4 dropped
    assert int(fake.hget(STATS_KEY, "webhooks_failed")) == 1005  # every one counted
