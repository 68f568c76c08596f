"""How the worker's main process cuts buffered messages into batches (no pool, no broker)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from producer.wire import PRIORITIES, Job, jobs_to_kwargs
from worker.batching import DynamicBatches


class RecordingBatches(DynamicBatches):
    """DynamicBatches whose flush records each batch instead of handing it to a pool."""

    def __init__(self, slots: int, batch_size: int) -> None:
        super().__init__()
        self.pool_slots = slots
        self.flush_every = batch_size
        self.batches: list[list[str]] = []

    def flush(self, requests: Any) -> None:
        self._busy += 1
        self.batches.append([r.id for r in requests])


def message(name: str, n_jobs: int, alone: bool = False) -> SimpleNamespace:
    jobs = [Job(f"{name}-{i}", b"x") for i in range(n_jobs)]
    return SimpleNamespace(id=name, _payload=((), jobs_to_kwargs(jobs, alone), {}))


def buffered(task: RecordingBatches, *messages: SimpleNamespace) -> RecordingBatches:
    for m in messages:
        task._buffer.put_nowait(m)
    return task


def test_batches_are_counted_in_jobs_not_messages() -> None:
    chunks = [message("a", 5), message("b", 5), message("c", 1), message("d", 16)]
    task = buffered(RecordingBatches(slots=3, batch_size=8), *chunks)
    task._do_flush()
    # A batch closes once it holds batch_size jobs; a chunk is never split.
    assert task.batches == [["a", "b"], ["c", "d"]]


def test_a_message_marked_alone_makes_a_batch_of_its_own() -> None:
    task = buffered(RecordingBatches(slots=5, batch_size=64),
                    message("a", 1), message("s1", 1, alone=True), message("s2", 1, alone=True),
                    message("b", 1), message("c", 1))  # fmt: skip
    task._do_flush()
    assert task.batches == [["a"], ["s1"], ["s2"], ["b", "c"]]


def test_no_batch_goes_out_while_every_pool_process_is_busy() -> None:
    task = buffered(RecordingBatches(slots=1, batch_size=2),
                    message("a", 1), message("s", 1, alone=True), message("b", 1))  # fmt: skip
    task._do_flush()
    assert task.batches == [["a"]]
    assert task._buffered_jobs() == 2  # "s" waits at the head, carried over, not lost
    task._busy = 0
    task._do_flush()
    assert task.batches == [["a"], ["s"]]
    task._busy = 0
    task._do_flush()
    assert task.batches == [["a"], ["s"], ["b"]]


class Delivered(SimpleNamespace):
    """A buffered request that records what became of its message."""

    def acknowledge(self) -> None:
        self.fate = "acked"

    def reject(self, requeue: bool) -> None:
        self.fate = "requeued" if requeue else "dropped"


def test_a_batch_that_could_not_store_is_given_back_after_a_doubling_pause(monkeypatch) -> None:
    """The batch function answers every job whatever raises; only Redis refusing the results
    fails a batch, and then its messages wait before going back: a worker never spins."""
    monkeypatch.setattr("worker.batching.SimpleRequest.from_request", lambda r: r)
    task = DynamicBatches()
    task.time_limit = 7.0
    submitted: list[Any] = []
    pauses: list[float] = []
    task._pool = SimpleNamespace(apply_async=lambda *a, **kw: submitted.append(kw))
    task._timer = SimpleNamespace(call_after=lambda secs, fn: (pauses.append(secs), fn()))
    for _ in range(7):
        request = Delivered(id="m", _payload=((), jobs_to_kwargs([Job("j", b"x")]), {}))
        task.flush([request])
        assert submitted[-1]["timeout"] == 7.0  # the batch's hard time limit
        submitted[-1]["callback"](None)  # what celery-batches returns when the batch raised
        assert request.fate == "requeued"
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    ok = Delivered(id="m", _payload=((), jobs_to_kwargs([Job("j", b"x")]), {}))
    task.flush([ok])
    submitted[-1]["callback"]("stored")
    assert ok.fate == "acked" and "m" not in task._tries


def test_a_batch_past_its_time_limit_counts_as_a_death_and_goes_back_at_once(
    monkeypatch,
) -> None:
    from billiard.einfo import ExceptionInfo
    from billiard.exceptions import TimeLimitExceeded

    monkeypatch.setattr("worker.batching.SimpleRequest.from_request", lambda r: r)
    task = DynamicBatches()
    submitted: list[Any] = []
    deaths: list[list[str]] = []
    task._pool = SimpleNamespace(apply_async=lambda *a, **kw: submitted.append(kw))
    task._timer = SimpleNamespace(call_after=lambda *_: pytest.fail("paused a death"))
    task.on_worker_lost = deaths.append
    request = Delivered(id="m", _payload=((), jobs_to_kwargs([Job("a", b"x"), Job("b", b"x")]), {}))
    task.flush([request])
    try:
        raise TimeLimitExceeded(7.0)
    except TimeLimitExceeded:
        submitted[-1]["error_callback"](ExceptionInfo())
    assert deaths == [["a", "b"]] and request.fate == "requeued"


def prioritized(name: str, n_jobs: int, priority: str) -> SimpleNamespace:
    request = message(name, n_jobs)
    request.delivery_info = {"priority": PRIORITIES[priority]}
    return request


def test_buffered_work_is_batched_high_first() -> None:
    task = buffered(RecordingBatches(slots=1, batch_size=4),
                    prioritized("bulk-1", 4, "low"), prioritized("n", 1, "normal"),
                    prioritized("bulk-2", 4, "low"), prioritized("h1", 1, "high"),
                    prioritized("h2", 1, "high"))  # fmt: skip
    for _ in range(4):
        task._busy = 0
        task._do_flush()
    # High, then normal, then low, one priority a batch: high work never waits for bulk.
    assert task.batches == [["h1", "h2"], ["n"], ["bulk-1"], ["bulk-2"]]


def test_low_work_is_not_starved_by_a_steady_stream_of_high_work() -> None:
    task = RecordingBatches(slots=1, batch_size=1)
    task._buffer.put_nowait(prioritized("low", 1, "low"))
    task._buffer.put_nowait(prioritized("normal", 1, "normal"))
    for i in range(8):
        task._buffer.put_nowait(prioritized(f"high-{i}", 1, "high"))
        task._busy = 0
        task._do_flush()
    batched = [b[0] for b in task.batches]
    # One batch in eight starts with normal work, one with low: both within eight batches.
    assert "low" in batched and "normal" in batched
    assert batched.index("normal") < 4 and batched.index("low") < 8
