"""Forged and malformed messages put straight on the queue; what a job leaves behind.

Whatever lands on the queue, the worker survives, runs nothing it carries, and fails each
job it can name with a clear error. A job's image is gone from Redis once it is answered,
and never appears in a result or the worker's log.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchery.local import WorkerProcess
from producer.client import Client
from producer.settings import Settings
from producer.wire import Job, build_message, ledger_due_key, ledger_key
from tests.factories import bomb_png, corrupt_png, digit_image, digit_paths, encode

pytestmark = pytest.mark.integration


class CreatesAFile:
    """Unpickling this creates a file: the proof that a pickle body ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def envelope(job_id: str, image: bytes | None = None, **changes: Any) -> dict[str, Any]:
    """A valid message for one job as a dict, with top-level ``changes`` applied."""
    raw = build_message([Job(job_id, image or digit_paths(1)[0].read_bytes())], "batchery").raw
    message: dict[str, Any] = json.loads(raw)
    message.update(changes)
    return message


def with_body(message: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The message with ``body`` in base64, as stock Celery producers send bodies."""
    properties = {**message["properties"], "body_encoding": "base64"}
    return {**message, "body": base64.b64encode(body).decode("ascii"), "properties": properties}


def push(client: Client, message: dict[str, Any]) -> None:
    client.redis.lpush(client.settings.queue, json.dumps(message))


def still_serving(client: Client, worker: WorkerProcess) -> None:
    worker.check_alive()
    assert client.result(client.submit(digit_paths(1)[0]), timeout=60)["status"] == "SUCCESS"


def test_a_pickle_message_is_dropped_and_nothing_it_carries_runs(client, worker, tmp_path):
    proof = tmp_path / "pickle-ran"
    message = with_body(envelope("pickle-job"), pickle.dumps(CreatesAFile(proof)))
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    push(client, message)
    result = client.result("pickle-job", timeout=30)
    assert result["status"] == "FAILURE"
    assert "message refused" in result["error"] and "pickle" in result["error"]
    still_serving(client, worker)
    assert not proof.exists()
    assert "refused message (content type 'application/x-python-serialize'" in (
        worker.log_path.read_text()
    )


@pytest.mark.parametrize(
    ("case", "message", "reason"),
    [
        ("not-json", with_body(envelope("h-1"), b"{not json"), "cannot read its body"),
        ("unknown-task", envelope("h-2", headers={**envelope("h-2")["headers"],
                                                  "task": "os.system"}),
         "unknown task 'os.system'; this worker runs 'batchery.classify'"),
        ("wrong-image-type", with_body(envelope("h-3"), json.dumps(
            [[], {"jobs": [{"id": "h-3", "image": 12345}]}, {}]).encode()),
         "invalid job: image must be base64 text"),
        ("jobs-not-a-list", with_body(envelope("h-4"), json.dumps(
            [[], {"jobs": "h-4"}, {}]).encode()), "malformed message"),
        ("bad-base64", with_body(envelope("h-5"), json.dumps(
            [[], {"jobs": [{"id": "h-5", "image": "@@@"}]}, {}]).encode()),
         "invalid job: image is not valid base64"),
        ("body-not-a-task", with_body(envelope("h-6"), json.dumps({"a": 1}).encode()),
         "message refused"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "",
)  # fmt: skip
def test_a_malformed_message_fails_its_job_and_the_worker_carries_on(
    client, worker, case: str, message: dict[str, Any], reason: str
) -> None:
    job_id = message["headers"]["id"]
    push(client, message)
    result = client.result(job_id, timeout=30)
    assert result["status"] == "FAILURE", case
    assert reason in result["error"], result["error"]
    still_serving(client, worker)


def test_a_message_without_headers_is_dropped_and_the_worker_carries_on(client, worker):
    message = envelope("no-headers")
    message["headers"] = {}
    push(client, message)
    # Celery reads it as an old-protocol message without a task name: its job is named in
    # the body, so it is failed.
    result = client.result("no-headers", timeout=30)
    assert result["status"] == "FAILURE" and "message refused" in result["error"]
    still_serving(client, worker)


def unique_digit(seed: int) -> bytes:
    """A digit no other test sends: a few pixels changed at random."""
    pixels = np.array(digit_image(digit_paths(1)[0]))
    rng = np.random.default_rng(seed)
    pixels[rng.integers(0, 28, 8), rng.integers(0, 28, 8)] = rng.integers(0, 256, 8)
    from PIL import Image

    return encode(Image.fromarray(pixels))


def strings_in(value: Any) -> list[str]:
    """Every string in a Redis value, JSON inside it, and base64 inside that, unpacked."""
    found: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if isinstance(item, dict):
            stack += list(item.keys()) + list(item.values())
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str):
            found.append(item)
            with contextlib.suppress(ValueError):
                stack.append(json.loads(item))
            if len(item) >= 16:
                with contextlib.suppress(binascii.Error, ValueError):
                    stack.append(base64.b64decode(item, validate=True))
    return found


def keys_holding(client: Client, needle: str) -> list[str]:
    """The Redis keys whose value contains ``needle``, however deeply packed."""
    r = client.redis
    read = {
        "string": r.get,
        "list": lambda key: r.lrange(key, 0, -1),
        "hash": r.hgetall,
        "set": lambda key: list(r.smembers(key)),
        "zset": lambda key: r.zrange(key, 0, -1),
    }
    holders = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        value: Any = read[kind](key) if kind in read else None
        if value is not None and any(needle in s for s in strings_in(value)):
            holders.append(key.decode())
    return holders


def test_a_jobs_image_is_gone_from_redis_once_it_is_answered(client, redis_server) -> None:
    image = unique_digit(1)
    needle = base64.b64encode(image).decode()[40:100]
    # The search finds an image while it waits (on a queue no worker reads)...
    parked = Client(settings=Settings(redis_url=redis_server.url, queue="parked"))
    parked.submit(image)
    assert sorted(keys_holding(client, needle)) == [ledger_key("parked"), "parked"]
    client.redis.delete("parked", ledger_key("parked"), ledger_due_key("parked"))
    # ...and nothing once the job is answered and its message acknowledged.
    result = client.result(client.submit(image), timeout=30)
    assert result["status"] == "SUCCESS"
    deadline = time.monotonic() + 10
    while holders := keys_holding(client, needle):
        assert time.monotonic() < deadline, f"the image is still in {holders}"
        time.sleep(0.1)


def test_images_never_appear_in_results_or_the_workers_log(client, worker) -> None:
    good, broken = unique_digit(2), corrupt_png(digit_paths(1)[0])
    results = client.results(client.submit_many([good, broken]), timeout=30)
    assert [r["status"] for r in results] == ["SUCCESS", "FAILURE"]
    refused = envelope("unknown-with-image", good)
    refused["headers"]["task"] = "no.such.task"
    push(client, refused)
    assert client.result("unknown-with-image", timeout=30)["status"] == "FAILURE"
    log = worker.log_path.read_text()
    for image in (good, broken):
        encoded = base64.b64encode(image).decode()
        for needle in (encoded[40:100], repr(image[40:80])[2:-1]):
            assert needle not in log
            assert not any(needle in json.dumps(r) for r in results)


WRONG_TYPES: list[Any] = [None, 5, -1.5, "", "x" * 300, [], {}, ["a", None], {"a": [1]}, True]


def test_headers_and_properties_of_every_wrong_type_never_stop_the_worker(client, worker):
    base = envelope("typed")
    sent = 0
    for field in [*base["headers"], "properties", "content-encoding", "body"]:
        for value in WRONG_TYPES:
            message = json.loads(json.dumps(base))
            if field in base["headers"]:
                message["headers"][field] = value
            else:
                message[field] = value
            message["headers"]["id"] = message["headers"].get("id") or "typed"
            client.redis.lpush(client.settings.queue, json.dumps(message))
            sent += 1
    assert sent > 150
    still_serving(client, worker)
    assert "Unrecoverable error" not in worker.log_path.read_text()


@pytest.mark.parametrize(
    "raw",
    ["not json at all", "[1, 2, 3]", '{"properties": null}', '{"body": 5}',
     json.dumps({**envelope("bad-b64"), "body": "%%%"}), "null", '"a string"'],
)  # fmt: skip
def test_what_is_not_even_an_envelope_is_dropped(client, worker, raw: str) -> None:
    client.redis.lpush(client.settings.queue, raw)
    still_serving(client, worker)
    assert "Unrecoverable error" not in worker.log_path.read_text()


def test_a_bomb_that_bypassed_the_producer_fails_alone(client, worker) -> None:
    bomb = bomb_png(20_000, 20_000)
    good = digit_paths(1)[0].read_bytes()
    raw = build_message([Job("bomb-good", good), Job("bomb-bomb", bomb)], "batchery").raw
    client.redis.lpush(client.settings.queue, raw)
    got = client.results(["bomb-good", "bomb-bomb"], timeout=30)
    assert [r["status"] for r in got] == ["SUCCESS", "FAILURE"]
    assert "400000000 pixels is over the limit of 40000000 pixels" in got[1]["error"]
    still_serving(client, worker)
