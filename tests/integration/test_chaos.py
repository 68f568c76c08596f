"""Chaos: a job submitted is a job answered, through kills, shutdowns and a Redis restart.

Each test runs 2,000 jobs through a Redis with appendonly on and real worker processes,
breaks something mid-run, and checks that every job ends SUCCESS with the right label, none
lost, none answered twice as clients see it (a job's first answer is kept: SET NX, so the
`done` counter counts each job once), all answered within a bound of the break. Jobs
computed again (their second answer discarded) are counted in `computed_twice`, and printed
with the figures.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.settings import Settings
from producer.wire import STATS_KEY, UNACKED_KEY, deaths_key, heartbeat_key
from tests.factories import digit_paths, label_of, wait_until_serving

pytestmark = pytest.mark.integration

JOBS = 2000
VISIBILITY_S = 5
# From the break to the last answer: what the break costs, plus the rest of the run's jobs
# (under 3 s of work here). A standby worker is serving before a whole worker is broken.
POOL_KILL_BOUND_S = 10.0  # the pool gives a dead process's batch back within ~1 s
WORKER_KILL_BOUND_S = VISIBILITY_S + 10.0  # its messages come back after the timeout
SIGTERM_BOUND_S = 60.0  # a new worker's start-up (TensorFlow, the model), then the rest
REDIS_RESTART_BOUND_S = 30.0  # workers and producers reconnect with backoff


@pytest.fixture(scope="module")
def durable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        args=("--appendonly", "yes", "--appendfsync", "everysec"),
        workdir=tmp_path_factory.mktemp("aof"),
    )
    with server:
        yield server


@pytest.fixture
def redis_url(durable_redis: RedisServer) -> str:
    Client(durable_redis.url).redis.flushall()
    return durable_redis.url


def start_worker(url: str) -> WorkerProcess:
    env = {"BATCHERY_VISIBILITY_TIMEOUT": str(VISIBILITY_S), "BATCHERY_QUEUE": "chaos"}
    return WorkerProcess(url, "--concurrency", "2", "--batch-size", "16", env=env).start()


def chaos_client(url: str) -> Client:
    return Client(settings=Settings(redis_url=url, queue="chaos", chunk_size=16,
                                    connect_retry_s=60,
                                    visibility_timeout_s=VISIBILITY_S))  # fmt: skip


def start_run(
    url: str, answered: int = 300, jobs: int = JOBS
) -> tuple[WorkerProcess, Client, list[str], list[str]]:
    """A serving worker, ``jobs`` jobs submitted, ``answered`` of them already answered."""
    worker = start_worker(url)
    client = chaos_client(url)
    wait_until_serving(client, worker)
    client.redis.hset(STATS_KEY, "done", 0)
    paths = digit_paths()
    images = [paths[i % len(paths)] for i in range(jobs)]
    ids = client.submit_many(images)
    wait_for_answers(client, answered)
    return worker, client, ids, [label_of(p) for p in images]


def wait_for_answers(client: Client, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while int(client.redis.hget(STATS_KEY, "done") or 0) < n:
        assert time.monotonic() < deadline, f"fewer than {n} answers after {timeout} s"
        time.sleep(0.01)


def check_all_answered(
    client: Client, ids: list[str], labels: list[str], broke_at: float, what: str, kills: int,
    bound_s: float, already: int = 0,
) -> None:  # fmt: skip
    results = client.results(ids, timeout=bound_s + 60)
    recovered_s = time.monotonic() - broke_at
    lost = [r["job_id"] for r in results if r["status"] != "SUCCESS"]
    wrong = sum(r["label"] != label for r, label in zip(results, labels, strict=True))
    stats = client.redis.hgetall(STATS_KEY)
    done = int(stats.get(b"done", 0)) - already
    twice = int(stats.get(b"computed_twice", 0))
    print(f"\n{what}: jobs {len(ids)}, kills {kills}, lost {len(lost)}, "
          f"answered twice {done - len(ids)}, computed twice {twice}, "
          f"break to last answer {recovered_s:.1f} s (bound {bound_s:g} s)")  # fmt: skip
    assert not lost, f"{len(lost)} jobs not answered: {lost[:5]}"
    assert wrong <= len(ids) * 0.05  # the model's own error rate on these digits is ~3%
    assert done == len(ids), "a job was answered twice"
    assert recovered_s < bound_s


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def busy_child(client: Client, pid: int, timeout: float = 30) -> int:
    """A serving pool process that is running (state R) right now: one in the middle of a batch.

    Serving means warmed up, which its heartbeat says: a replacement process still loading its
    model is busy too, but holds no batch.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children(pid):
            try:
                stat = Path(f"/proc/{child}/stat").read_text()
            except FileNotFoundError:
                continue
            serving = client.redis.exists(heartbeat_key(f"{socket.gethostname()}:{child}"))
            if stat.rsplit(")", 1)[1].split()[0] == "R" and serving:
                return child
    raise AssertionError("no serving pool process was busy")


def test_sigkill_of_a_pool_process_mid_batch(redis_url: str) -> None:
    worker, client, ids, labels = start_run(redis_url, answered=200)
    try:
        assert worker.process is not None
        # A process seen running may not have taken its batch yet (the pool then gives the
        # batch to another process): kill again, with more jobs queued if the run ran low,
        # until one dies holding a batch, which the worker's log then reports.
        paths = digit_paths()
        kills = 0
        while "died holding" not in worker.log_path.read_text():
            assert kills < 10, "no kill caught a process holding a batch"
            if int(client.redis.hget(STATS_KEY, "done") or 0) > len(ids) - 1000:
                more = [paths[i % len(paths)] for i in range(1000)]
                ids += client.submit_many(more)
                labels += [label_of(p) for p in more]
            os.kill(busy_child(client, worker.process.pid), signal.SIGKILL)
            kills += 1
            broke_at = time.monotonic()
            while "died holding" not in worker.log_path.read_text():
                if time.monotonic() > broke_at + 3:
                    break
                time.sleep(0.05)
        check_all_answered(client, ids, labels, broke_at, "SIGKILL pool process", kills,
                           POOL_KILL_BOUND_S)  # fmt: skip
        # Once the dead process's jobs were answered (isolated, or found already answered),
        # no death count is held against them any more.
        deadline = time.monotonic() + 30
        while any(client.redis.get(deaths_key(i)) is not None for i in ids):
            assert time.monotonic() < deadline, "death counts left behind"
            time.sleep(0.2)
    finally:
        worker.stop()


def standby_worker(url: str, client: Client, timeout: float = 240) -> WorkerProcess:
    """A second worker, started and waited for until both its pool processes beat."""
    worker = start_worker(url)
    assert worker.process is not None
    deadline = time.monotonic() + timeout
    while True:
        worker.check_alive()
        beats = [heartbeat_key(f"{socket.gethostname()}:{c}") for c in children(worker.process.pid)]
        if len(beats) == 2 and all(client.redis.exists(b) for b in beats):
            return worker
        assert time.monotonic() < deadline, "the standby worker did not start"
        time.sleep(0.2)


def restore_lock(url: str) -> tuple[str, int]:
    """kombu's restore lock in a worker, its key and how long it lasts: what a channel of a
    worker built from the same settings holds."""
    from worker.app import create_app

    app = create_app(Settings(redis_url=url, queue="chaos"))
    with app.connection_for_write() as connection:
        qos = connection.default_channel.qos  # what kombu's restore passes to its Mutex
        return qos.unacked_mutex_key, int(qos.unacked_mutex_expire)


def test_sigkill_of_the_whole_worker_with_another_serving(redis_url: str) -> None:
    """Killed at the worst moment: while it held kombu's restore lock (set here as the dead
    worker would have, for as long as a worker takes it), which the other worker must wait
    out before it gives the dead one's messages back."""
    lock_key, lock_s = restore_lock(redis_url)
    assert lock_s <= 10, f"a worker that dies holding the restore lock stalls restores {lock_s} s"
    first, client, ids, labels = start_run(redis_url, jobs=1000, answered=1000)
    second = standby_worker(redis_url, client)
    try:
        # Both serving now: a fresh run, and the kill while the first holds some of it.
        paths = digit_paths()
        more = [paths[i % len(paths)] for i in range(JOBS)]
        ids, labels = client.submit_many(more), [label_of(p) for p in more]
        wait_for_answers(client, 1000 + 300)
        assert first.process is not None
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait()
        broke_at = time.monotonic()
        client.redis.set(lock_key, b"the dead worker's token", ex=lock_s)
        check_all_answered(client, ids, labels, broke_at, "SIGKILL worker, another serving", 1,
                           WORKER_KILL_BOUND_S + lock_s, already=1000)  # fmt: skip
        # What the dead worker held came back through the visibility timeout, once the lock
        # it left had expired (the lock took: the other worker waited for it).
        assert time.monotonic() - broke_at > max(VISIBILITY_S, lock_s) - 1
    finally:
        second.stop()


def test_sigterm_gives_back_what_was_not_started_at_once(redis_url: str) -> None:
    first, client, ids, labels = start_run(redis_url)
    first.stop(timeout=60)  # SIGTERM: warm shutdown
    broke_at = time.monotonic()
    assert first.process is not None and first.process.returncode == 0
    # Given back as it exited (no other worker runs), not left for the visibility timeout.
    assert client.redis.hlen(UNACKED_KEY) == 0 and client.redis.llen("chaos") > 0
    second = start_worker(redis_url)
    try:
        check_all_answered(client, ids, labels, broke_at, "SIGTERM + new worker", 0,
                           SIGTERM_BOUND_S)  # fmt: skip
    finally:
        second.stop()


def test_redis_restart_mid_run(durable_redis: RedisServer, redis_url: str) -> None:
    worker, client, ids, labels = start_run(redis_url)
    try:
        durable_redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        broke_at = time.monotonic()
        time.sleep(2)
        durable_redis.start()
        check_all_answered(client, ids, labels, broke_at, "Redis restart", 0,
                           REDIS_RESTART_BOUND_S)  # fmt: skip
        # The worker carried on: a new job after the restart is answered too.
        assert client.result(client.submit(digit_paths(1)[0]), timeout=60)["status"] == "SUCCESS"
    finally:
        worker.stop()
