import json
import os
import struct
import threading
import time

import fakeredis
import numpy as np
import pytest
from PIL import Image

from producer.client import Client
from producer.errors import (
    InvalidImageError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
)
from producer.settings import Settings
from producer.wire import JobResult, encode_result_meta, jobs_from_kwargs, result_key
from tests.factories import digit_image, digit_paths, encode, noise_array


def queued_messages(r: fakeredis.FakeRedis, queue: str = "batchery") -> list[dict]:
    """Messages in consumption order (Celery's Redis transport pops from the right)."""
    return [json.loads(raw) for raw in reversed(r.lrange(queue, 0, -1))]


def queued_jobs(r: fakeredis.FakeRedis) -> list:
    jobs = []
    for msg in queued_messages(r):
        _, kwargs, _ = json.loads(msg["body"])
        jobs.extend(jobs_from_kwargs(kwargs))
    return jobs


def test_submit_enqueues_one_message_whose_task_id_is_the_job_id(client, fake_redis) -> None:
    path = digit_paths(1)[0]
    job_id = client.submit(path)
    [msg] = queued_messages(fake_redis)
    assert msg["headers"]["id"] == job_id
    [job] = queued_jobs(fake_redis)
    assert job.id == job_id and job.image == path.read_bytes()
    assert job.model is None and job.version is None


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p,
        lambda p: str(p),
        lambda p: p.read_bytes(),
        lambda p: digit_image(p),
        lambda p: np.asarray(digit_image(p)),
        lambda p: np.asarray(digit_image(p))[:, :, None] / 255.0,
    ],
    ids=["path", "str", "bytes", "pil", "uint8-array", "float-array"],
)
def test_every_input_kind_becomes_a_decodable_image(client, fake_redis, make) -> None:
    path = digit_paths(1)[0]
    client.submit(make(path), model="mnist-cnn", version="1")
    [job] = queued_jobs(fake_redis)
    assert job.model == "mnist-cnn" and job.version == "1"
    with Image.open(__import__("io").BytesIO(job.image)) as img:
        assert np.array_equal(np.asarray(img.convert("L")), np.asarray(digit_image(path)))


def test_submit_many_packs_chunks_in_order_in_one_push(client, fake_redis) -> None:
    paths = digit_paths() + digit_paths()[:50]  # 150 jobs, chunks of 64
    ids = client.submit_many(paths)
    assert len(ids) == 150 and len(set(ids)) == 150
    sizes = [len(json.loads(m["body"])[1]["jobs"]) for m in queued_messages(fake_redis)]
    assert sizes == [64, 64, 22]
    assert [job.id for job in queued_jobs(fake_redis)] == ids


def test_one_bad_input_enqueues_nothing_and_names_the_file(client, fake_redis, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InvalidImageError, match=r"notes\.png"):
        client.submit_many([*digit_paths(3), bad])
    assert fake_redis.llen("batchery") == 0


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("/no/such/file.png", "no such file"),
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 40, "not a readable image|not accepted"),
        (np.zeros((2, 3, 5), np.uint8), "HxW"),
        (np.full((4, 4), 2.0), r"\[0, 1\]"),
        (12345, "expected a path"),
    ],
)
def test_refused_inputs_say_why(client, fake_redis, image, reason) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        client.submit(image)
    assert fake_redis.llen("batchery") == 0


def test_gif_is_outside_the_allow_list(client) -> None:
    gif = encode(Image.fromarray(noise_array()), "GIF")
    with pytest.raises(InvalidImageError, match="GIF is not accepted"):
        client.submit(gif)


def test_byte_limit_is_checked_before_reading(fake_redis, tmp_path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(encode(Image.fromarray(noise_array((200, 200)))))
    small_limit = Client(settings=Settings(max_image_bytes=1000), redis_client=fake_redis)
    with pytest.raises(InvalidImageError, match="over the limit of 1000 bytes"):
        small_limit.submit(big)


def store(r: fakeredis.FakeRedis, result: JobResult) -> None:
    r.set(result_key(result.job_id), encode_result_meta(result))


def test_result_reads_the_stored_dict(client, fake_redis) -> None:
    store(fake_redis, JobResult("j1", "SUCCESS", "mnist-cnn", "1", "4", 4, 0.99))
    assert client.result("j1")["label"] == "4"


def test_result_without_timeout_returns_pending_at_once(client) -> None:
    started = time.monotonic()
    assert client.result("nobody")["status"] == "PENDING"
    assert time.monotonic() - started < 0.5


def test_result_timeout_raises_a_clear_error(client) -> None:
    with pytest.raises(ResultTimeoutError, match=r"nobody has no result after 0\.2 s"):
        client.result("nobody", timeout=0.2)


def test_result_wakes_when_the_result_is_published(client, fake_redis) -> None:
    def answer_later() -> None:
        time.sleep(0.3)
        meta = encode_result_meta(JobResult("late", "SUCCESS", label="1"))
        fake_redis.set(result_key("late"), meta)
        fake_redis.publish(result_key("late"), meta)

    threading.Thread(target=answer_later).start()
    started = time.monotonic()
    assert client.result("late", timeout=10)["label"] == "1"
    assert time.monotonic() - started < 5


def test_results_keep_input_order_and_report_pending(client, fake_redis) -> None:
    store(fake_redis, JobResult("a", "SUCCESS", label="1"))
    store(fake_redis, JobResult("c", "FAILURE", error="cannot decode image"))
    got = client.results(["c", "b", "a"], timeout=0.1)
    assert [r["job_id"] for r in got] == ["c", "b", "a"]
    assert [r["status"] for r in got] == ["FAILURE", "PENDING", "SUCCESS"]


def test_unreachable_redis_is_retried_then_named_without_its_password() -> None:
    client = Client(settings=Settings(redis_url="redis://:hunter2@127.0.0.1:1/0",
                                      connect_retry_s=0.5))  # fmt: skip
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        client.submit(digit_paths(1)[0])
    assert time.monotonic() - started >= 0.4  # retried, for a bounded time
    assert "127.0.0.1:1" in str(info.value) and "hunter2" not in str(info.value)
    assert "BATCHERY_CONNECT_RETRY" in str(info.value)


def test_a_full_queue_waits_then_refuses_and_enqueues_nothing(fake_redis) -> None:
    settings = Settings(max_queue=2, queue_wait_s=0.3, chunk_size=1)
    client = Client(settings=settings, redis_client=fake_redis)
    client.submit_many(digit_paths(2))
    started = time.monotonic()
    with pytest.raises(QueueFullError, match=r"BATCHERY_MAX_QUEUE=2.*nothing was enqueued"):
        client.submit(digit_paths(3)[2])
    assert time.monotonic() - started >= 0.25
    assert fake_redis.llen("batchery") == 2


def test_a_full_queue_accepts_again_once_it_drains(fake_redis) -> None:
    client = Client(settings=Settings(max_queue=1, queue_wait_s=5), redis_client=fake_redis)
    client.submit(digit_paths(1)[0])
    threading.Timer(0.3, lambda: fake_redis.rpop("batchery")).start()
    client.submit(digit_paths(2)[1])  # waits for the worker to take the first one
    assert fake_redis.llen("batchery") == 1


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF header claiming ``width`` x ``height``: Pillow's bomb check raises on opening it."""
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


@pytest.mark.parametrize(
    ("data", "named"),
    [(gif_claiming(20000, 20000), "GIF"), (b"II*\x00" + b"\x00" * 64, "TIFF"),
     (b"MM\x00*" + b"\x00" * 64, "TIFF"), (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 32, "HEIF")],
)  # fmt: skip
def test_formats_outside_the_allow_list_are_named_never_opened(client, data, named) -> None:
    with pytest.raises(InvalidImageError, match=f"format {named}.* is not accepted"):
        client.submit(data)


def test_devices_and_fifos_are_refused_never_read(client, tmp_path) -> None:
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    for path in (device, fifo):
        with pytest.raises(InvalidImageError, match="not a regular file"):
            client.submit(path)


def test_a_call_too_big_for_one_push_is_refused_before_anything_is_sent(
    client: Client, fake_redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer.client

    monkeypatch.setattr(producer.client, "MAX_PUSH_BYTES", 20_000)
    image = digit_paths(1)[0].read_bytes()
    with pytest.raises(InvalidImageError, match="over the 0 MiB one push may carry"):
        client.submit_many([image] * 100)
    assert fake_redis.llen("batchery") == 0
    assert len(client.submit_many([image] * 10)) == 10  # under it: pushed as ever


def test_jobs_take_the_lane_of_their_version_and_are_refused_when_only_lite_workers_are_up(
    fake_redis,
) -> None:
    from producer.errors import NoWorkerError
    from producer.wire import heartbeat_key

    client = Client(settings=Settings(), redis_client=fake_redis)  # the shipped registry
    assert client.job_template(version="3").lane == "lite"  # mnist-cnn@3 is LiteRT
    assert client.job_template().lane == "" and client.job_template(version="1").lane == ""
    fake_redis.set(heartbeat_key("h:1"), "lite")
    client._kinds_at = float("-inf")  # read the workers again now, not in 2 s
    with pytest.raises(NoWorkerError, match="every worker up is a lite one"):
        client.submit(digit_paths(1)[0])
    assert fake_redis.llen("batchery") == 0  # nothing was enqueued
    client.submit(digit_paths(1)[0], version="3")  # a lite worker serves it
    assert fake_redis.llen("batchery.lite") == 1
    fake_redis.set(heartbeat_key("h:2"), "full")
    client._kinds_at = float("-inf")
    client.submit(digit_paths(1)[0])
    assert fake_redis.llen("batchery") == 1
