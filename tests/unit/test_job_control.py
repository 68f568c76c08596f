"""Job control with fakeredis: priorities on the wire, cancellation (and `batchery cancel`'s
exit status), deadlines (and the worker's default), the priority label on the metrics."""

from __future__ import annotations

import json
import time
from typing import Any

import fakeredis
import pytest

from producer.client import Client
from producer.errors import InvalidJobError
from producer.settings import Settings
from producer.wire import (
    CANCELLED,
    EXPIRED,
    STATS_KEY,
    Job,
    JobResult,
    jobs_to_kwargs,
    queue_key,
    read_jobs,
)
from tests.factories import Request, digit_paths
from worker import tasks as tasks_module
from worker.tasks import BatchRunner

GOOD = digit_paths(1)[0].read_bytes()


@pytest.fixture
def client(fake_redis: fakeredis.FakeRedis) -> Client:
    return Client(settings=Settings(chunk_size=4), redis_client=fake_redis)


def queued(r: fakeredis.FakeRedis, key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in r.lrange(key, 0, -1)]


def test_each_priority_travels_on_its_own_list(client, fake_redis) -> None:
    client.submit(GOOD, priority="high")
    client.submit_many([GOOD] * 5, priority="low")
    client.submit(GOOD)
    high, normal, low = (queued(fake_redis, queue_key("batchery", p))
                         for p in ("high", "normal", "low"))  # fmt: skip
    assert [len(high), len(normal), len(low)] == [1, 1, 2]
    assert high[0]["properties"]["priority"] == 3 and low[0]["properties"]["priority"] == 6
    assert normal[0]["properties"]["priority"] == 0  # where a stock Celery producer's go
    assert queue_key("batchery", "normal") == "batchery"
    [(jobs, _)] = [read_jobs(json.loads(m["body"])[1]) for m in high]
    assert jobs[0].priority == "high"


def test_a_bad_priority_or_deadline_is_refused_before_enqueueing(client, fake_redis) -> None:
    for kwargs in ({"priority": "urgent"}, {"deadline_s": -1}, {"deadline_s": float("nan")},
                   {"deadline_s": 10**9}, {"deadline_s": "soon"}):  # fmt: skip
        with pytest.raises(InvalidJobError):
            client.submit(GOOD, **kwargs)
    assert fake_redis.dbsize() == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", "urgent"), ("priority", 3), ("deadline_s", 0), ("deadline_s", True)],
)
def test_workers_refuse_the_same_fields(field: str, value: Any) -> None:
    wire = {**Job("j", GOOD).to_wire(), field: value}
    _, [(job_id, reason)] = read_jobs({"jobs": [wire]})
    assert job_id == "j" and field in reason


def test_the_default_deadline_applies_to_jobs_that_name_none(fake_redis) -> None:
    client = Client(settings=Settings(default_deadline_s=30.0), redis_client=fake_redis)
    client.submit(GOOD)
    client.submit(GOOD, deadline_s=5)
    bodies = [json.loads(m["body"])[1]["jobs"][0] for m in queued(fake_redis, "batchery")]
    assert sorted(b["deadline_s"] for b in bodies) == [5, 30.0]


def test_cancel_withdraws_what_is_not_answered_and_keeps_what_is(client, fake_redis) -> None:
    queued_id, answered_id = client.submit(GOOD), client.submit(GOOD)
    BatchRunner(Settings(), None, fake_redis).store([JobResult(answered_id, "SUCCESS")])  # type: ignore[arg-type]
    assert client.cancel_many([queued_id, answered_id, "never-seen"]) == [True, False, True]
    assert client.result(queued_id)["status"] == CANCELLED
    assert client.result(answered_id)["status"] == "SUCCESS"
    assert client.result("never-seen")["status"] == CANCELLED  # it can never run now
    assert client.cancel(queued_id) is False  # already cancelled: answered
    assert int(fake_redis.hget(STATS_KEY, "cancelled")) == 2


@pytest.fixture
def runner(models, fake_redis) -> BatchRunner:
    return BatchRunner(Settings(), models, fake_redis)


def counting_forward_passes(monkeypatch) -> list[int]:
    """How many images each forward pass of the runner was given."""
    seen: list[int] = []
    real = tasks_module.BatchRunner._classify_with

    def spy(self: BatchRunner, model: Any, jobs: Any) -> Any:
        seen.append(len(jobs))
        return real(self, model, jobs)

    monkeypatch.setattr(tasks_module.BatchRunner, "_classify_with", spy)
    return seen


def test_a_cancelled_job_inside_a_chunk_is_never_computed(client, runner, fake_redis,
                                                          monkeypatch) -> None:  # fmt: skip
    seen = counting_forward_passes(monkeypatch)
    jobs = [Job(f"j{i}", GOOD) for i in range(8)]
    client.cancel("j3")
    results = runner.run([Request("chunk", jobs_to_kwargs(jobs))])
    assert sorted(r.job_id for r in results) == [f"j{i}" for i in range(8) if i != 3]
    assert seen == [7]  # the batch never saw it
    assert client.result("j3")["status"] == CANCELLED


def test_a_job_past_its_deadline_is_expired_not_computed(runner, fake_redis, monkeypatch) -> None:
    seen = counting_forward_passes(monkeypatch)
    late = Job("late", GOOD, submitted_at=time.time() - 10, deadline_s=1.0)
    timely = Job("timely", GOOD, submitted_at=time.time(), deadline_s=60.0)
    results = {r.job_id: r for r in runner.run([Request("m", jobs_to_kwargs([late, timely]))])}
    assert results["late"].status == EXPIRED and "deadline of 1 s" in (results["late"].error or "")
    assert results["late"].label is None and results["timely"].status == "SUCCESS"
    assert seen == [1]
    assert int(fake_redis.hget(STATS_KEY, "expired")) == 1


def test_a_job_cancelled_while_its_batch_ran_is_counted_not_answered(runner, fake_redis) -> None:
    client = Client(settings=Settings(), redis_client=fake_redis)
    client.cancel("running")
    runner.store([JobResult("running", "SUCCESS", label="7")])
    assert client.result("running")["status"] == CANCELLED
    assert int(fake_redis.hget(STATS_KEY, "cancelled_late")) == 1
    assert fake_redis.hget(STATS_KEY, "computed_twice") is None


def test_a_cancellation_from_an_older_producer_is_counted_too(runner, fake_redis) -> None:
    """Its meta, written by the standard library's json, is spaced, not compact."""
    import json

    from producer.wire import encode_result_meta, result_key

    compact = encode_result_meta(JobResult.cancelled("old"))
    fake_redis.set(result_key("old"), json.dumps(json.loads(compact)))
    assert '"status": "CANCELLED"' in fake_redis.get(result_key("old")).decode()
    runner.store([JobResult("old", "SUCCESS", label="7")])
    assert int(fake_redis.hget(STATS_KEY, "cancelled_late")) == 1
    assert fake_redis.hget(STATS_KEY, "computed_twice") is None


# --- the CLI: cancel's exit status ---------------------------------------------------------


@pytest.fixture
def batchery(fake_redis, monkeypatch) -> Any:
    """``batchery ARGS...`` run in this process (its exit status), its Client on fakeredis."""
    from batchery import cli

    def on_fake(settings: Settings) -> Client:
        return Client(settings=settings, redis_client=fake_redis)

    monkeypatch.setattr("producer.client.Client", on_fake)
    return lambda *argv: cli.main(list(argv))


def test_cancel_exits_0_when_every_job_was_cancelled(client, batchery, capsys) -> None:
    ids = [client.submit(GOOD), client.submit(GOOD)]
    assert batchery("cancel", *ids, "never-seen") == 0  # an unknown id is cancelled too
    assert capsys.readouterr().out.splitlines() == [
        f"{ids[0]}: cancelled",
        f"{ids[1]}: cancelled",
        "never-seen: cancelled",
    ]
    assert [client.result(j)["status"] for j in ids] == [CANCELLED, CANCELLED]


def test_cancel_exits_1_if_any_job_was_already_answered(
    client, fake_redis, batchery, capsys
) -> None:
    queued_id, answered_id = client.submit(GOOD), client.submit(GOOD)
    BatchRunner(Settings(), None, fake_redis).store([JobResult(answered_id, "SUCCESS")])  # type: ignore[arg-type]
    assert batchery("cancel", queued_id, answered_id) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{queued_id}: cancelled",
        f"{answered_id}: already answered (SUCCESS), kept",
    ]
    assert client.result(queued_id)["status"] == CANCELLED  # the rest are cancelled all the same
    assert client.result(answered_id)["status"] == "SUCCESS"
    # Cancelled before is answered (CANCELLED): cancelling it again exits 1 too.
    assert batchery("cancel", queued_id) == 1
    assert capsys.readouterr().out == f"{queued_id}: already answered (CANCELLED), kept\n"


# --- the worker's default deadline, and the priority label on its metrics ----------------


def test_the_workers_default_deadline_expires_jobs_that_name_none(models, fake_redis) -> None:
    now = time.time()
    jobs = [
        Job("old", GOOD, submitted_at=now - 6),  # past the default of 5 s
        Job("recent", GOOD, submitted_at=now - 4),  # within it
        Job("own", GOOD, submitted_at=now - 6, deadline_s=60.0),  # its own deadline wins
    ]
    runner = BatchRunner(Settings(default_deadline_s=5.0), models, fake_redis)
    results = {r.job_id: r for r in runner.run([Request("m", jobs_to_kwargs(jobs))])}
    assert results["old"].status == EXPIRED and "deadline of 5 s" in (results["old"].error or "")
    assert results["recent"].status == "SUCCESS" and results["own"].status == "SUCCESS"
    assert int(fake_redis.hget(STATS_KEY, "expired")) == 1
    # Without the default, the same old job with no deadline is computed.
    unset = BatchRunner(Settings(), models, fake_redis)
    again = Job("old-again", GOOD, submitted_at=now - 6)
    [result] = unset.run([Request("n", jobs_to_kwargs([again]))])
    assert result.status == "SUCCESS"


def test_jobs_answered_are_counted_by_priority(models, fake_redis) -> None:
    from prometheus_client import REGISTRY

    from worker.metrics import Metrics

    metrics = Metrics()
    try:
        runner = BatchRunner(Settings(), models, fake_redis, recorded=metrics)
        jobs = [Job("h1", GOOD, priority="high"), Job("h2", GOOD, priority="high"),
                Job("l1", GOOD, priority="low"), Job("n1", GOOD)]  # fmt: skip
        runner.run([Request("m", jobs_to_kwargs(jobs))])
        version = models.resolve(None, None).version
        counted = {
            sample.labels["priority"]: sample.value
            for family in REGISTRY.collect() if family.name == "batchery_jobs"
            for sample in family.samples if sample.name == "batchery_jobs_total"
        }  # fmt: skip
        assert counted == {"high": 2.0, "low": 1.0, "normal": 1.0}
        labels = {"model": "mnist-cnn", "version": version, "status": "SUCCESS"}
        assert REGISTRY.get_sample_value("batchery_jobs_total",
                                         {**labels, "priority": "high"}) == 2.0  # fmt: skip
    finally:
        for collector in vars(metrics).values():  # every one Metrics registered
            REGISTRY.unregister(collector)
