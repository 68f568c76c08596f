"""Webhooks without a network: the signature, who may be called, and the delivery queued in
the same script that stores an answer (fakeredis)."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest

from producer.client import Client
from producer.errors import InvalidJobError, WebhookRefusedError
from producer.settings import Settings
from producer.webhooks import WebhookPolicy, backoff, sign, verify
from producer.wire import (
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
