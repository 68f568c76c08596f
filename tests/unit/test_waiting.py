"""producer.waiting: the one sync way to wait, behind Client.result, Client.results and classify."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from producer.bulk import classify
from producer.client import Client
from producer.waiting import MGET_KEYS, Pace, Waiter
from producer.wire import SUCCESS, JobResult, encode_result_meta, result_key
from tests.factories import digit_paths


def store(redis_client: fakeredis.FakeRedis, *job_ids: str, label: str = "7") -> None:
    for job_id in job_ids:
        result = JobResult(job_id, SUCCESS, model="m", version="1", label=label, score=0.9)
        redis_client.set(result_key(job_id), encode_result_meta(result))


def test_pace_doubles_on_empty_looks_up_to_its_cap_and_skips_when_a_look_found_its_goal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    pace = Pace(first=0.001, most=0.004)
    for _ in range(4):
        pace.wait(0, 160)
    assert slept == [0.001, 0.002, 0.004, 0.004]
    pace.wait(10, 160)  # 160 // 16 = 10: the goal met, look again at once
    pace.wait(5, 0)  # nothing in flight: nothing to wait for
    assert slept == [0.001, 0.002, 0.004, 0.004]
    pace.wait(0, 160, limit=0.0005)  # never past the caller's deadline
    assert slept[-1] == 0.0005


def test_pace_follows_the_rate_answers_come_at() -> None:
    pace = Pace(first=0.0005, most=0.05)
    pace.since = time.monotonic() - 1.0  # 1,000 answers in one second: 1 ms each
    pace.record(1000, 160)
    assert pace.pause == pytest.approx(0.010, rel=0.05)  # a 16th of 160 at 1,000/s
    pace.record(1, 16_000_000)  # a goal far beyond the cap
    assert pace.pause == 0.05


def test_a_full_look_is_an_exact_snapshot_in_bounded_mgets(client: Client) -> None:
    ids = [f"job-{i}" for i in range(2500)]
    answered = [*ids[::7], ids[-1]]  # scattered, not in order
    store(client.redis, *answered)
    calls: list[int] = []
    fetch = client.fetch
    client.fetch = lambda job_ids, forget=(): calls.append(len(job_ids)) or fetch(job_ids, forget)  # type: ignore[method-assign]
    found = Waiter(client).look(ids)
    assert sorted(found) == sorted(set(answered))
    assert max(calls) <= MGET_KEYS and len(calls) == 3


def test_a_probing_look_reads_up_to_the_last_probe_answered(client: Client) -> None:
    ids = [f"job-{i}" for i in range(256)]
    store(client.redis, *ids[:100])  # answered in order, as batches come
    calls: list[int] = []
    fetch = client.fetch
    client.fetch = lambda job_ids, forget=(): calls.append(len(job_ids)) or fetch(job_ids, forget)  # type: ignore[method-assign]
    found = Waiter(client).look(ids, step=32)
    # Probes 0, 32, 64, 96 answered (128 not): the jobs up to 128 are read, no further.
    assert sorted(found, key=lambda k: int(k.split("-")[1])) == ids[:100]
    assert calls == [8, 128 - 4]
    assert Waiter(client).look(ids[100:], step=32) == {}


def test_many_returns_once_all_are_answered_and_at_the_deadline_with_what_came(
    client: Client,
) -> None:
    store(client.redis, "a")
    started = time.monotonic()
    found = Waiter(client).many(["a", "b"], time.monotonic() + 0.3)
    assert list(found) == ["a"] and 0.3 <= time.monotonic() - started < 1.0
    later = threading.Timer(0.2, store, (client.redis, "b"))
    later.start()
    started = time.monotonic()
    found = Waiter(client).many(["a", "b", "a"], time.monotonic() + 30)
    assert sorted(found) == ["a", "b"] and time.monotonic() - started < 1.0


def test_result_results_and_classify_all_wait_through_the_clients_waiter(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one helper: a client whose waiter answers every job it is asked about (as a worker
    would) gets results from all three, and nothing of theirs reads results another way."""
    used: list[str] = []
    look, one = Waiter.look, Waiter.one

    def answering_look(self: Waiter, waiting: Any, step: int = 1, forget: Any = ()) -> Any:
        used.append("look")
        store(client.redis, *waiting)
        return look(self, waiting, step, forget)

    def answering_one(self: Waiter, job_id: str, deadline: float) -> Any:
        used.append("one")
        store(client.redis, job_id)
        return one(self, job_id, deadline)

    monkeypatch.setattr(Waiter, "look", answering_look)
    monkeypatch.setattr(Waiter, "one", answering_one)
    assert client.result("lone", timeout=5)["status"] == SUCCESS and used == ["one"]
    assert [r["status"] for r in client.results(["x", "y"], timeout=5)] == [SUCCESS] * 2
    assert used[-1] == "look"
    out = tmp_path / "out.jsonl"
    summary = classify(client, [str(p) for p in digit_paths(40)], out, progress=None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.total == 40 and [r["status"] for r in rows] == [SUCCESS] * 40
    assert used.count("look") > 1 and used.count("one") == 1


def test_results_without_a_timeout_is_one_snapshot(client: Client) -> None:
    store(client.redis, "done")
    got = client.results(["done", "not-yet"])
    assert [r["status"] for r in got] == [SUCCESS, "PENDING"]
