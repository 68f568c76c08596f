"""Every job answered, whatever it carries, against a real redis-server and worker.

A stock Celery producer (``app.send_task``) sends messages that each mix one bad job with
good ones; a trusted model kills or hangs its process for one input; models are planted in
the registry by hand. Every good job is answered SUCCESS, every bad one FAILURE, the worker
goes quiet afterwards, and no log line starts with text the sender wrote.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.ledger import Ledger
from producer.registry import META_FILE, Registry, sha256_of
from producer.settings import Settings
from producer.wire import (
    DEAD_LETTER_KEY,
    MAX_JOBS_PER_MESSAGE,
    STATS_KEY,
    TASK_CLASSIFY,
    UNACKED_KEY,
    Job,
    build_message,
    ledger_key,
    result_key,
)
from tests.factories import digit_paths, wait_until_serving
from tests.integration import trap_model
from worker.publish import publish_model

pytestmark = pytest.mark.integration

QUEUE = "answered"
MAX_IMAGE_BYTES = 100_000
PREFETCH_JOBS = 64
FORGED = "FORGED-LOG-LINE"
GOOD = digit_paths(1)[0].read_bytes()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """mnist-cnn, the trap model (published with --trust), and two models planted by hand."""
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root / "models")
    registry.publish(trap_model.SHIPPED, "mnist-cnn", trap_model.LABELS, (28, 28, 1))
    trap_file = trap_model.build(root / "trap.keras")
    publish_model(registry, trap_file, "trap", trap_model.LABELS, trust=True)
    # Planted, not published: a Lambda model without the trust flag, and an .h5 file.
    for name, file, fmt in (("planted-lambda", trap_file, "keras"),
                            ("planted-h5", trap_file, "h5")):  # fmt: skip
        folder = registry.root / name / "1"
        folder.mkdir(parents=True)
        target = folder / ("model.keras" if fmt == "keras" else "model.h5")
        target.write_bytes(file.read_bytes())
        meta = json.loads((registry.root / "mnist-cnn" / "1" / META_FILE).read_text())
        meta.update(name=name, file=target.name, format=fmt, sha256=sha256_of(target))
        (folder / META_FILE).write_text(json.dumps(meta))
    return registry


TIME_LIMIT_S = 10


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, registry: Registry) -> Iterator[WorkerProcess]:
    env = {
        "BATCHERY_QUEUE": QUEUE,
        "BATCHERY_MODEL_DIR": str(registry.root),
        "BATCHERY_POISON_KILLS": "2",
        # Over what a fresh pool process takes to load the trap model cold (inside the
        # limit: a job isolated after a death runs in a new process), on a slow day.
        "BATCHERY_BATCH_TIME_LIMIT": str(TIME_LIMIT_S),
        "BATCHERY_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "BATCHERY_PREFETCH_JOBS": str(PREFETCH_JOBS),
    }
    args = ("--concurrency", "2", "--batch-size", "16", "--batch-wait-ms", "500")
    with WorkerProcess(redis_server.url, *args, env=env) as proc:
        wait_until_serving(client_for(redis_server, registry), proc)
        yield proc


def client_for(redis_server: RedisServer, registry: Registry) -> Client:
    settings = Settings(redis_url=redis_server.url, queue=QUEUE, model_dir=registry.root,
                        max_image_bytes=MAX_IMAGE_BYTES)  # fmt: skip
    return Client(settings=settings)


@pytest.fixture
def client(redis_server: RedisServer, registry: Registry, worker: WorkerProcess) -> Client:
    return client_for(redis_server, registry)


def stock_celery(url: str) -> Celery:
    app = Celery(broker=url, backend=url)
    app.conf.update(task_serializer="json", result_accept_content=["json"])
    return app


def good_job(job_id: str) -> dict[str, Any]:
    return Job(job_id, GOOD).to_wire()


#: One bad job each, sent beside good ones: (its id, its fields, what its FAILURE says).
BAD_JOBS = [
    ("long-name", {"model": "m" * 300}, "model"),
    ("forged-log", {"model": f"x\n{FORGED} INFO batch of 1 jobs"}, "model"),
    ("path-name", {"model": "../../../etc/passwd"}, "model"),
    ("wrong-type", {"image": 12345}, "image"),
    ("list-model", {"model": ["mnist-cnn"]}, "model"),
    ("not-base64", {"image": "%%%%"}, "base64"),
    ("oversized", {"image": base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()}, "limit"),
    ("unknown-model", {"model": "resnet"}, "unknown model"),
]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, children)]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def test_a_stock_producer_mixing_bad_jobs_with_good_strands_none(client, worker) -> None:
    app = stock_celery(client.settings.redis_url)
    good_ids: list[str] = []
    for n, (bad_id, fields, _) in enumerate(BAD_JOBS):
        goods = [good_job(f"good-{n}-{i}") for i in range(20)]
        good_ids += [g["id"] for g in goods]
        jobs = [*goods[:10], {**good_job(bad_id), **fields}, *goods[10:]]
        app.send_task(TASK_CLASSIFY, kwargs={"jobs": jobs}, queue=QUEUE)
    # A 400-digit submit time is ignored, not fatal; a 10 KB id can't be answered by its id.
    huge_time = {**good_job("huge-time"), "submitted_at": 10**400}
    huge_id = {**good_job("x" * 10_000)}
    app.send_task(TASK_CLASSIFY, kwargs={"jobs": [huge_time, huge_id, good_job("beside-id")]},
                  queue=QUEUE)  # fmt: skip
    too_many = [good_job(f"many-{i}") for i in range(MAX_JOBS_PER_MESSAGE + 1)]
    app.send_task(TASK_CLASSIFY, kwargs={"jobs": too_many}, queue=QUEUE)

    started = time.monotonic()
    results = {r["job_id"]: r for r in client.results(good_ids, timeout=30)}
    assert all(r["status"] == "SUCCESS" for r in results.values()), [
        r for r in results.values() if r["status"] != "SUCCESS"
    ][:3]
    for bad_id, _, says in BAD_JOBS:
        bad = client.result(bad_id, timeout=10)
        assert bad["status"] == "FAILURE" and says in bad["error"], bad
        assert len(bad["error"]) <= 300 and "\n" not in bad["error"]
    late = client.results(["huge-time", "beside-id", "many-0", f"many-{MAX_JOBS_PER_MESSAGE}"],
                          timeout=10)  # fmt: skip
    assert [r["status"] for r in late] == ["SUCCESS", "SUCCESS", "FAILURE", "FAILURE"]
    assert "over the limit of 1024" in late[2]["error"]
    assert client.redis.get(result_key("x" * 10_000)) is None
    assert int(client.redis.hget(STATS_KEY, "refused") or 0) >= 1
    answered_in = time.monotonic() - started

    # Quiet afterwards: nothing requeued again and again.
    assert worker.process is not None
    time.sleep(1.0)
    before = cpu_seconds(worker.process.pid)
    time.sleep(5.0)
    idle_cpu = (cpu_seconds(worker.process.pid) - before) / 5.0
    print(f"\nanswered in {answered_in:.1f} s; idle worker CPU {idle_cpu * 100:.1f}% of a core")
    assert idle_cpu < 0.10
    assert client.redis.llen(QUEUE) == 0 and client.redis.hlen(UNACKED_KEY) == 0

    log = worker.log_path.read_text(errors="replace")
    assert FORGED in log  # it was logged, escaped, inside a line of ours
    assert not [line for line in log.splitlines() if line.startswith(FORGED)]


def test_a_job_that_kills_its_worker_is_isolated_then_dead_lettered(client, worker) -> None:
    batch = [GOOD] * 10 + [trap_model.marked("all")] + [GOOD] * 10
    ids = client.submit_many(batch, model="trap")
    results = client.results(ids, timeout=120)
    poison = results[10]
    assert poison["status"] == "FAILURE" and "killed its worker process 2 times" in poison["error"]
    assert [r["status"] for r in results[:10] + results[11:]] == ["SUCCESS"] * 20
    letters = [json.loads(x) for x in client.redis.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert ids[10] in [letter["job_id"] for letter in letters]
    worker.check_alive()


def test_a_batch_that_hangs_is_killed_at_its_time_limit(client, worker) -> None:
    started = time.monotonic()
    ids = client.submit_many([GOOD] * 5 + [trap_model.marked("top")] + [GOOD] * 5, model="trap")
    results = client.results(ids, timeout=120)
    hung = results[5]
    assert hung["status"] == "FAILURE" and "killed its worker process 2 times" in hung["error"]
    assert [r["status"] for r in results[:5] + results[6:]] == ["SUCCESS"] * 10
    print(f"\na hanging job answered FAILURE after {time.monotonic() - started:.1f} s "
          f"(time limit {TIME_LIMIT_S} s, 2 deaths)")  # fmt: skip
    assert "TimeLimitExceeded" in worker.log_path.read_text()


@pytest.mark.parametrize("name", ["planted-lambda", "planted-h5"])
def test_a_model_planted_in_the_registry_by_hand_is_refused_at_load(client, name) -> None:
    result = client.result(client.submit(GOOD, model=name), timeout=60)
    assert result["status"] == "FAILURE"
    assert "--trust" in result["error"], result["error"]


def test_a_lone_job_never_waits_for_a_batch_to_fill(client) -> None:
    client.result(client.submit(GOOD), timeout=30)
    times = []
    for _ in range(10):
        started = time.perf_counter()
        assert client.result(client.submit(GOOD), timeout=10)["status"] == "SUCCESS"
        times.append(time.perf_counter() - started)
    times.sort()
    print(f"\nlone job, --batch-wait-ms 500: median {times[5] * 1000:.0f} ms, "
          f"worst {times[-1] * 1000:.0f} ms")  # fmt: skip
    # Waiting for the batch to fill would put every one of them past 500 ms.
    assert times[5] < 0.25 and times[-2] < 0.45


def drain_peak(client: Client) -> int:
    """The most messages the worker held unacknowledged while the queue drained."""
    peak = 0
    deadline = time.monotonic() + 120
    while client.redis.llen(QUEUE) and time.monotonic() < deadline:
        peak = max(peak, client.redis.hlen(UNACKED_KEY))
        time.sleep(0.002)
    return peak


def test_prefetch_is_counted_in_jobs_not_messages(client) -> None:
    """256-job messages: the worker takes another only while fewer than PREFETCH_JOBS (64)
    of its jobs wait for a pool process. A message may span batches, so what it holds is
    the message still being cut (under 64 jobs left), the one taken after it, and at most
    one more whose last part still runs: 3 messages. Stock kombu counts messages
    (worker_prefetch_multiplier x concurrency = 64 of them) and would take all 12.
    One-job messages: never more than 64 waiting, besides the two batches running (of up
    to 16 jobs, one job a message)."""
    ids = client.submit_many([GOOD] * 3000)  # 12 messages
    bulk_peak = drain_peak(client)
    results = client.results(ids, timeout=60)
    assert all(r["status"] == "SUCCESS" for r in results)
    with Client(settings=replace(client.settings, chunk_size=1)) as singles:
        ids = singles.submit_many([GOOD] * 600)
    single_peak = drain_peak(client)
    results = client.results(ids, timeout=60)
    assert all(r["status"] == "SUCCESS" for r in results)
    print(f"\nmost messages held at once: {bulk_peak} of 256 jobs, {single_peak} of one")
    assert 1 <= bulk_peak <= 3
    assert 1 <= single_peak <= PREFETCH_JOBS + 2 * 16 + 1


def test_prefetch_is_bounded_in_bytes_too(redis_server, registry) -> None:
    """BATCHERY_PREFETCH_BYTES below one message's size, with no job limit to speak of: the
    worker takes another message only once the bytes of those waiting are under the limit
    (a message counts until its last part leaves): 3 messages held at most, as for jobs.
    Without it, the job limit (10,000) would let it take all 12."""
    queue = "bytes-bound"
    env = {"BATCHERY_QUEUE": queue, "BATCHERY_MODEL_DIR": str(registry.root),
           "BATCHERY_PREFETCH_JOBS": "10000", "BATCHERY_PREFETCH_BYTES": "100000"}  # fmt: skip
    settings = Settings(redis_url=redis_server.url, queue=queue, model_dir=registry.root)
    with WorkerProcess(redis_server.url, "--concurrency", "2", "--batch-size", "16",
                       env=env) as proc, Client(settings=settings) as client:  # fmt: skip
        wait_until_serving(client, proc)
        ids = client.submit_many([GOOD] * 3000)  # 12 messages of about 140 KB
        peak = 0
        deadline = time.monotonic() + 120
        while client.redis.llen(queue) and time.monotonic() < deadline:
            peak = max(peak, client.redis.hlen(UNACKED_KEY))
            time.sleep(0.002)
        results = client.results(ids, timeout=60)
    assert all(r["status"] == "SUCCESS" for r in results)
    print(f"\nmost messages held at once, 100 KB prefetch: {peak}")
    assert 1 <= peak <= 3


def test_a_message_over_the_byte_limit_is_dropped_unread(client, worker) -> None:
    limit = client.settings.message_limit
    client.redis.lpush(QUEUE, json.dumps({"body": "x" * (limit + 1), "properties": {}}))
    assert client.result(client.submit(GOOD), timeout=30)["status"] == "SUCCESS"
    assert f"over the limit of {limit}" in worker.log_path.read_text()


def test_a_refused_message_is_struck_off_the_ledger_at_once(client, worker) -> None:
    message = build_message([Job("refused-job", GOOD)], QUEUE)
    envelope = json.loads(message.raw)
    envelope["headers"]["task"] = "os.system"
    refused = message._replace(raw=json.dumps(envelope))
    Ledger(client.redis, QUEUE).push([refused], check_after_s=60)
    result = client.result("refused-job", timeout=30)
    assert result["status"] == "FAILURE" and "unknown task" in result["error"]
    assert not client.redis.hexists(ledger_key(QUEUE), message.id)
