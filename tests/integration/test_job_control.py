"""Job control against a real redis-server and worker: priority, cancellation, deadlines.

Ordering is asserted on what was left when a job was answered (a backlog not yet drained),
never on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from batchery.local import RedisServer
from producer.client import Client
from producer.wire import (
    CANCELLED,
    EXPIRED,
    PRIORITIES,
    STATS_KEY,
    UNACKED_KEY,
    queue_key,
    read_jobs,
)
from tests.factories import digit_paths

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GOOD = digit_paths(1)[0].read_bytes()


def answered(client: Client, ids: list[str]) -> int:
    return sum(len(client.fetch(ids[i : i + 1000])) for i in range(0, len(ids), 1000))


def stat(client: Client, name: str) -> int:
    return int(client.redis.hget(STATS_KEY, name) or 0)


def drained(client: Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    lists = [queue_key(client.settings.queue, p) for p in ("high", "normal", "low")]
    while any(client.redis.llen(key) for key in lists) or client.redis.hlen(UNACKED_KEY):
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.05)


def test_high_jobs_overtake_a_backlog_of_low_ones(client: Client) -> None:
    backlog = client.submit_many([GOOD] * 20_000, priority="low")
    urgent = [client.submit(GOOD, priority="high") for _ in range(10)]
    results = client.results(urgent, timeout=30)
    left = len(backlog) - answered(client, backlog)
    print(f"\n10 high jobs answered with {left} of 20,000 low jobs still to go")
    assert [r["status"] for r in results] == ["SUCCESS"] * 10
    assert left > 5_000  # they did not wait for the backlog
    assert all(r["status"] == "SUCCESS" for r in client.results(backlog, timeout=60))


def test_low_work_is_not_starved_by_a_stream_of_high_work(client: Client) -> None:
    stream = client.submit_many([GOOD] * 30_000, priority="high")
    low = client.submit(GOOD, priority="low")
    assert client.result(low, timeout=60)["status"] == "SUCCESS"
    left = len(stream) - answered(client, stream)
    print(f"\nthe low job was answered with {left} of 30,000 high jobs still to go")
    assert left > 5_000
    client.results(stream, timeout=60)


def test_cancel_queued_in_a_chunk_answered_and_unknown(client: Client) -> None:
    done = client.submit(GOOD)
    client.result(done, timeout=30)
    late_before = stat(client, "cancelled_late")
    client.submit_many([GOOD] * 5_000)  # ahead of the chunk
    chunk = client.submit_many([GOOD] * 256)  # one message of 256 jobs
    unknown = f"never-submitted-{uuid.uuid4()}"  # other tests share this Redis
    assert client.cancel_many([chunk[100], done, unknown]) == [True, False, True]
    results = client.results(chunk, timeout=60)
    assert results[100]["status"] == CANCELLED
    assert [r["status"] for i, r in enumerate(results) if i != 100] == ["SUCCESS"] * 255
    assert client.result(done)["status"] == "SUCCESS"  # kept its answer
    drained(client)
    assert stat(client, "cancelled_late") == late_before  # never computed


def test_an_expired_job_is_not_computed(client: Client) -> None:
    expired_before = stat(client, "expired")
    client.submit_many([GOOD] * 10_000, priority="low")
    late = client.submit(GOOD, priority="low", deadline_s=0.01)
    result = client.result(late, timeout=60)
    assert result["status"] == EXPIRED and result["label"] is None
    assert "was not computed" in result["error"]
    assert stat(client, "expired") == expired_before + 1


def test_an_interrupted_classify_leaves_nothing_to_compute(
    client: Client, redis_server: RedisServer, tmp_path: Path
) -> None:
    from bench.run import make_images

    make_images(tmp_path / "in", 20_000, "reference")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "BATCHERY_REDIS_URL": redis_server.url}
    cmd = [sys.executable, "-m", "batchery.cli", "classify", str(tmp_path / "in"), "-o", str(out)]
    run = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not out.exists() or sum(1 for _ in out.open()) < 1_000:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    done_at_stop, late_at_stop = stat(client, "done"), stat(client, "cancelled_late")
    assert run.returncode == 130, stderr
    cancelled = int(stderr.split("interrupted: ")[1].split()[0])
    drained(client)
    computed_after = stat(client, "done") - done_at_stop
    print(f"\nclassify stopped: {cancelled} jobs in flight cancelled, {computed_after} computed "
          f"after (already in running batches)")  # fmt: skip
    assert cancelled >= 1_000
    # Only batches already running finish: two pool processes, a 256-job message each.
    assert computed_after <= 2 * 256 + 256
    assert stat(client, "cancelled_late") - late_at_stop <= 2 * 256 + 256
    rows_before = sum(1 for _ in out.open())
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    rows = out.read_text().splitlines()
    assert len(rows) == 20_000 and rows_before < 20_000
    assert all('"SUCCESS"' in row for row in rows)


def test_classify_submits_at_low_priority_by_default(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # No worker serves this queue: what classify pushed stays in Redis to be read.
    queue = f"classify-unserved-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BATCHERY_REDIS_URL": redis_server.url, "BATCHERY_QUEUE": queue}
    cmd = [sys.executable, "-m", "batchery.cli", "classify", *map(str, digit_paths(3)),
           "-o", str(tmp_path / "out.jsonl")]  # fmt: skip
    r = redis.Redis.from_url(redis_server.url)
    lists = {p: queue_key(queue, p) for p in PRIORITIES}
    run = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not any(r.llen(key) for key in lists.values()):
            assert run.poll() is None, run.communicate()[1]
            assert time.monotonic() < deadline, "classify pushed nothing"
            time.sleep(0.05)
    finally:
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=60)
    assert {p: r.llen(key) for p, key in lists.items()} == {"high": 0, "normal": 0, "low": 1}
    [raw] = r.lrange(lists["low"], 0, -1)
    message = json.loads(raw)
    assert message["properties"]["priority"] == PRIORITIES["low"]
    jobs, refused = read_jobs(json.loads(message["body"])[1])
    assert refused == [] and [job.priority for job in jobs] == ["low"] * 3
