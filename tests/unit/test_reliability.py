"""At-least-once's other half, with fakeredis: idempotent answers, death counts, poison jobs."""

from __future__ import annotations

import json
from pathlib import Path

import fakeredis
import pytest

from batchery.status import collect, render
from producer.client import Client
from producer.settings import Settings
from producer.wire import (
    DEAD_LETTER_KEY,
    STATS_KEY,
    WEBHOOK_STREAM,
    Job,
    JobResult,
    deaths_key,
    decode_result_meta,
    encode_result_meta,
    heartbeat_key,
    jobs_from_kwargs,
    jobs_to_kwargs,
    result_key,
)
from tests.factories import Request, digit_paths
from worker.app import count_deaths
from worker.models import ModelCache
from worker.tasks import BatchRunner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner(models: ModelCache, fake_redis: fakeredis.FakeRedis) -> BatchRunner:
    return BatchRunner(Settings(poison_kills=3), models, fake_redis)


def jobs(n: int) -> list[Job]:
    return [Job(f"job-{i}", p.read_bytes()) for i, p in enumerate(digit_paths(n))]


def test_a_redelivered_job_keeps_its_first_answer(runner, fake_redis) -> None:
    batch = jobs(3)
    fake_redis.set(result_key("job-1"), encode_result_meta(JobResult("job-1", "SUCCESS",
                                                                      label="first")))  # fmt: skip
    results = runner.run([Request("m", jobs_to_kwargs(batch))])
    assert [r.job_id for r in results] == ["job-0", "job-2"]  # job-1 was not recomputed
    assert decode_result_meta(fake_redis.get(result_key("job-1")))["label"] == "first"
    assert int(fake_redis.hget(STATS_KEY, "done")) == 2


def test_concurrent_duplicates_never_give_two_answers(runner, fake_redis) -> None:
    first = JobResult("dup", "SUCCESS", label="1")
    runner.store([first])
    runner.store([JobResult("dup", "SUCCESS", label="7")])  # a second delivery, racing
    assert decode_result_meta(fake_redis.get(result_key("dup")))["label"] == "1"
    assert int(fake_redis.hget(STATS_KEY, "done")) == 1


def test_jobs_whose_worker_died_are_isolated_one_a_message(runner, fake_redis) -> None:
    batch = jobs(4)
    fake_redis.set(deaths_key("job-1"), 1)
    fake_redis.set(deaths_key("job-3"), 2)
    results = runner.run([Request("m", jobs_to_kwargs(batch))])
    assert sorted(r.job_id for r in results) == ["job-0", "job-2"]
    requeued = [json.loads(raw) for raw in fake_redis.lrange("batchery", 0, -1)]
    kwargs = [json.loads(m["body"])[1] for m in requeued]
    assert sorted(j.id for k in kwargs for j in jobs_from_kwargs(k)) == ["job-1", "job-3"]
    assert all(len(k["jobs"]) == 1 and k["alone"] is True for k in kwargs)
    # Alone in its batch, a suspect simply runs; its death count is cleared once answered.
    [alone] = runner.run([Request("m", kwargs[0])])
    assert alone.status == "SUCCESS"
    assert fake_redis.get(deaths_key(alone.job_id)) is None


def test_a_job_that_killed_its_worker_k_times_is_dead_lettered(runner, fake_redis) -> None:
    batch = jobs(2)
    fake_redis.set(deaths_key("job-0"), 3)
    results = {r.job_id: r for r in runner.run([Request("m", jobs_to_kwargs(batch))])}
    assert results["job-0"].status == "FAILURE"
    assert "killed its worker process 3 times" in results["job-0"].error
    assert results["job-1"].status == "SUCCESS"
    [dead] = [json.loads(raw) for raw in fake_redis.lrange(DEAD_LETTER_KEY, 0, -1)]
    assert dead["job_id"] == "job-0" and dead["deaths"] == 3
    assert "image" not in dead  # the dead-letter list never holds image bytes


def test_the_main_process_counts_a_death_against_every_job_of_the_lost_batch() -> None:
    r = fakeredis.FakeRedis()
    settings = Settings()
    record = count_deaths(settings, connect=lambda _: r)
    record(["a", "b"])
    record(["a"])
    assert (int(r.get(deaths_key("a"))), int(r.get(deaths_key("b")))) == (2, 1)
    assert 0 < r.ttl(deaths_key("a")) <= settings.result_ttl_s
    # A job answered meanwhile (a redelivered copy ran) is not held responsible.
    r.set(result_key("c"), encode_result_meta(JobResult("c", "SUCCESS")))
    record(["b", "c"])
    assert int(r.get(deaths_key("b"))) == 2 and r.get(deaths_key("c")) is None


def test_status_reads_depth_flight_workers_counts_and_dead_letters(fake_redis) -> None:
    client = Client(settings=Settings(redis_url="redis://:pw@h:6379/0"), redis_client=fake_redis)
    client.submit_many(digit_paths(3))
    fake_redis.hset("unacked", "tag", "x")
    fake_redis.set(heartbeat_key("host:1"), "full", ex=10)
    fake_redis.set(heartbeat_key("host:2"), "lite", ex=10)
    fake_redis.set(heartbeat_key("host:3"), "1", ex=10)  # a worker from before kinds
    fake_redis.hset(STATS_KEY, mapping={"done": 5, "failed": 1, "batches": 2, "cancelled": 6,
                                        "expired": 7, "computed_twice": 3, "cancelled_late": 8,
                                        "refused": 4, "webhooks_delivered": 9,
                                        "webhooks_failed": 2, "canary_promoted": 10,
                                        "canary_rolled_back": 11})  # fmt: skip
    fake_redis.lpush(DEAD_LETTER_KEY, "{}")
    fake_redis.xadd(WEBHOOK_STREAM, {"job": "j", "url": "http://h/"})
    status = collect(client)
    assert status == {
        "redis": "redis://:***@h:6379/0", "queue": "batchery", "queue_depth": 1,
        "queue_depth_by_priority": {"high": 0, "normal": 1, "low": 0},
        "in_flight": 1, "backlog_jobs": 3, "workers_alive": 3,
        "workers": ["host:1", "host:2", "host:3"], "worker_kinds": {"full": 2, "lite": 1},
        "done": 5, "failed": 1,
        "batches": 2, "cancelled": 6, "expired": 7, "computed_twice": 3, "cancelled_late": 8,
        "refused": 4, "dead_letters": 1, "webhooks_pending": 1, "webhooks_delivered": 9,
        "webhooks_failed": 2, "canary_promoted": 10, "canary_rolled_back": 11, "rollouts": {},
    }  # fmt: skip
    shown = render(status)
    assert "workers alive  3 (2 TensorFlow: every format, 1 lite: LiteRT only)" in shown
    assert "canaries       10 promoted, 11 rolled back" in shown
    assert "1 messages waiting (high 0, normal 1, low 0), 1 in flight" in shown
    assert "3 jobs not answered yet" in shown  # three jobs in one message
    assert "5 done, 1 failed, 6 cancelled, 7 expired, in 2 batches" in shown
    assert "3 computed twice (answered once), 8 computed after being cancelled" in shown
    assert "4 refused without an id" in shown and "pw" not in shown
    assert "1 to deliver, 9 delivered, 2 given up" in shown


def test_capacity_arithmetic_for_a_target_rate() -> None:
    from bench.capacity import RedisCost, capacity

    # 20 µs of Redis CPU a job: one core carries 50,000 jobs/s, planned at half that.
    cost = RedisCost(jobs=1000, commands=12, bytes_in=600, bytes_out=400, cpu_ms=0.02)
    plan = capacity(100_000, per_core=1_000, cost=cost)
    assert plan["worker_cores"] == 100
    assert plan["jobs_per_redis"] == 25_000 and plan["redis_instances"] == 4
    assert plan["workers_per_redis"] == 25
    assert plan["mbit_in"] == 480 and plan["mbit_out"] == 320
