"""How the worker's main process cuts buffered messages into batches (no pool, no broker)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from producer.wire import PRIORITIES, Job, job_ids_in, jobs_to_kwargs
from worker.batching import DynamicBatches


class RecordingBatches(DynamicBatches):
    """DynamicBatches whose flush records each batch instead of handing it to a pool."""

    def __init__(self, slots: int, batch_size: int) -> None:
        super().__init__()
        self.pool_slots = slots
        self.flush_every = batch_size
        self.batches: list[list[str]] = []

    def _run(self, parts: Any) -> None:
        self._busy += 1
        self.batches.append([
            held.request.id if (start, end) == (0, held.size)
            else f"{held.request.id}[{start}:{end}]"
            for held, start, end in parts
        ])  # fmt: skip


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
    # A batch closes once it holds batch_size jobs; a chunk is split across batches.
    assert task.batches == [["a", "b[0:3]"], ["b[3:5]", "c", "d[0:5]"], ["d[5:13]"]]
    assert task._buffered_jobs() == 3  # d's last three wait for a free pool process


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
    submitted[-1]["callback"](("stored", 0.01, False, []))
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
    # One batch in eight starts with normal work, one with low (worker.batching.BATCH_SHARE):
    # counted from 1, batch 3 takes normal first and batch 7 low first, the rest high.
    assert batched == ["high-0", "high-1", "normal", "high-2", "high-3", "high-4", "low",
                       "high-5"]  # fmt: skip


# --- messages split over batches, and batches cut to a time budget -------------------------


class PoolStub:
    """A pool that records each batch handed to it; the test finishes them in any order."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def apply_async(self, fn: Any, args: Any, **kwargs: Any) -> None:
        self.batches.append({"requests": args[1][0], **kwargs})

    def jobs(self, i: int) -> list[str]:
        return [job["id"] for r in self.batches[i]["requests"] for job in r.kwargs["jobs"]]

    def done(self, i: int, seconds: float = 0.01) -> None:
        self.batches[i]["callback"](("stored", seconds, False, []))


def pooled(monkeypatch: Any, slots: int, batch_size: int, budget_s: float = 0.0) -> Any:
    from worker.batching import request_kwargs

    def simple(request: Any) -> SimpleNamespace:
        return SimpleNamespace(id=request.id, kwargs=request_kwargs(request), request_dict={})

    monkeypatch.setattr("worker.batching.SimpleRequest.from_request", simple)
    task = DynamicBatches()
    task.pool_slots, task.flush_every, task.budget_s = slots, batch_size, budget_s
    task._pool = pool = PoolStub()
    task._timer = SimpleNamespace(call_after=lambda secs, fn: fn())
    return task, pool


def delivered(name: str, n_jobs: int, priority: str = "normal") -> Delivered:
    jobs = [Job(f"{name}-{i}", b"x") for i in range(n_jobs)]
    return Delivered(id=name, fate=None, _payload=((), jobs_to_kwargs(jobs), {}),
                     delivery_info={"priority": PRIORITIES[priority]})  # fmt: skip


def test_a_256_job_message_split_over_batches_is_answered_once_and_acked_once(
    monkeypatch: Any,
) -> None:
    task, pool = pooled(monkeypatch, slots=2, batch_size=64)
    bulk = delivered("bulk", 256)
    acks: list[str] = []
    bulk.acknowledge = lambda: acks.append("bulk")  # type: ignore[method-assign]
    struck: list[list[str]] = []
    task.settle_split = struck.append
    task._buffer.put_nowait(bulk)
    task._do_flush()
    assert [len(pool.jobs(i)) for i in range(len(pool.batches))] == [64, 64]
    # Only the part that takes the message's last jobs strikes it off the ledger.
    pool.done(1)
    pool.done(0)
    pool.done(2)
    assert acks == []  # 64 jobs are still running: not acknowledged yet
    pool.done(3)
    assert acks == ["bulk"]
    sent = [jid for i in range(4) for jid in pool.jobs(i)]
    assert sorted(sent) == sorted(f"bulk-{i}" for i in range(256))  # each job once
    # A split message is struck off the ledger once, by the main process, when every part
    # is stored: none of its parts does it (its last part to start may finish first).
    settles = [r.settle for b in pool.batches for r in b["requests"]]
    assert settles == [False, False, False, False]
    assert struck == [["bulk"]]


def test_a_failed_part_gives_the_whole_message_back_once_its_other_parts_finish(
    monkeypatch: Any,
) -> None:
    task, pool = pooled(monkeypatch, slots=2, batch_size=64)
    bulk = delivered("bulk", 256)
    task._buffer.put_nowait(bulk)
    task._do_flush()
    pool.batches[0]["callback"](None)  # the batch function raised: the message goes back
    assert bulk.fate is None  # its other part is still running
    assert len(pool.batches) == 2  # and none of its jobs left waiting is started
    pool.done(1)
    assert bulk.fate == "requeued" and task._buffered_jobs() == 0


def test_a_killed_pool_process_counts_a_death_against_its_part_only(monkeypatch: Any) -> None:
    from billiard.einfo import ExceptionInfo
    from billiard.exceptions import WorkerLostError

    task, pool = pooled(monkeypatch, slots=2, batch_size=100)
    deaths: list[list[str]] = []
    task.on_worker_lost = deaths.append
    bulk = delivered("bulk", 150)
    task._buffer.put_nowait(bulk)
    task._do_flush()
    try:
        raise WorkerLostError("killed")
    except WorkerLostError:
        pool.batches[1]["error_callback"](ExceptionInfo())
    assert deaths == [[f"bulk-{i}" for i in range(100, 150)]]
    pool.done(0)
    assert bulk.fate == "requeued"


def test_high_work_overtakes_a_long_bulk_message_at_a_batch_boundary(monkeypatch: Any) -> None:
    task, pool = pooled(monkeypatch, slots=1, batch_size=64)
    task._buffer.put_nowait(delivered("bulk", 256, "low"))
    task._do_flush()
    task._buffer.put_nowait(delivered("urgent", 1, "high"))
    pool.done(0)  # the first bulk batch ends: the high job goes next, before bulk's rest
    assert pool.jobs(1) == ["urgent-0"]
    pool.done(1)
    assert pool.jobs(2) == [f"bulk-{i}" for i in range(64, 128)]


def test_prefetch_weighs_a_split_message_by_the_jobs_still_waiting() -> None:
    from worker.transport import WeighedQoS

    qos = WeighedQoS.__new__(WeighedQoS)
    qos._weights, qos._jobs, qos._bytes = {"t": (256, 1000)}, 256, 1000
    qos.started("t", 64)
    assert (qos._jobs, qos._bytes) == (192, 1000)
    qos.started("t", None)  # the last part: nothing of it waits any more
    assert (qos._jobs, qos._bytes, qos._weights) == (0, 0, {})


def test_batches_are_cut_to_the_budget_once_the_cost_is_known(monkeypatch: Any) -> None:
    from worker.budget import kind_of

    task, pool = pooled(monkeypatch, slots=1, batch_size=256, budget_s=0.025)
    task._buffer.put_nowait(delivered("bulk", 256))
    task._do_flush()
    assert len(pool.jobs(0)) == 1  # a kind never measured: a batch of one teaches its cost
    kind = kind_of(Job("x", b"x").to_wire())
    # Each job costs 1 ms plus 2 ms a batch: the estimate converges to a 25 ms batch.
    for i in range(40):
        n = len(pool.jobs(i))
        pool.done(i, seconds=0.002 + 0.001 * n)
        if task._buffered_jobs() == 0:
            break
        task._buffer.put_nowait(delivered(f"more-{i}", 256))
    sizes = [len(pool.jobs(i)) for i in range(len(pool.batches))]
    assert sizes[-1] in (22, 23, 24), sizes
    for i, n in enumerate(sizes[:-1]):
        predicted = task.costs.per_job(kind, n)
        assert predicted is not None and (n - 1) * 0.001 + 0.002 <= 0.025, (i, sizes)


def test_a_cut_goes_past_the_budget_by_at_most_one_job() -> None:
    from worker.budget import CostModel, Cut

    costs = CostModel()
    cheap, dear = ("m", "1", False, 10), ("m", "1", False, 23)
    costs.observe({cheap: 64}, 64 * 0.0002)
    costs.observe({dear: 1}, 0.045)  # a camera photo: 45 ms to decode
    cut = Cut(costs, budget_s=0.025, most_jobs=256)
    assert cut.fits(dear)  # the first job always goes in, whatever it costs
    assert not cut.fits(cheap)  # and nothing after it once past the budget
    cut = Cut(costs, budget_s=0.025, most_jobs=256)
    taken = 0
    while cut.fits(cheap):
        taken += 1
    assert taken == 125 and cut.seconds <= 0.025  # 125 x 0.2 ms
    unknown = Cut(costs, budget_s=0.025, most_jobs=256)
    assert unknown.fits(cheap) and not unknown.fits(("other", None, False, 10))


def test_an_explained_job_and_a_big_image_are_kinds_of_their_own() -> None:
    from worker.budget import kind_of

    small = Job("a", b"x" * 300).to_wire()
    photo = Job("b", b"x" * 4_000_000).to_wire()
    explained = {**small, "explain": True}
    assert len({kind_of(small), kind_of(photo), kind_of(explained)}) == 3
    assert kind_of({"id": "c", "path": "/data/x.jpg"})[3] == "path"
    assert kind_of("not a job") == (None, None, False, 0)


# --- the one-in-eight share, poll by poll and batch by batch --------------------------------


def test_one_poll_in_eight_reads_normal_first_and_one_low_first() -> None:
    from worker.transport import HIGH, LOW, NORMAL, Channel

    channel = Channel.__new__(Channel)  # take_order needs no connection
    firsts = [channel.take_order()[0] for _ in range(24)]
    # Counted from 1: poll 3 of every eight reads normal first, poll 7 low first.
    assert [i + 1 for i, first in enumerate(firsts) if first == NORMAL] == [3, 11, 19]
    assert [i + 1 for i, first in enumerate(firsts) if first == LOW] == [7, 15, 23]
    for start in range(len(firsts) - 7):  # any eight polls in a row
        window = firsts[start : start + 8]
        assert (window.count(HIGH), window.count(NORMAL), window.count(LOW)) == (6, 1, 1)


def test_each_poll_asks_redis_for_the_lists_in_its_take_order() -> None:
    from worker.transport import Channel

    sent: list[tuple[Any, ...]] = []
    connection = SimpleNamespace(send_command=lambda *args: sent.append(args))
    channel = Channel.__new__(Channel)
    channel._active_queues, channel.active_fanout_queues = ["batchery"], set()
    channel._queue_cycle = SimpleNamespace(consume=lambda n: ["batchery"])
    channel.client = SimpleNamespace(connection=connection)
    channel.global_keyprefix = ""
    for _ in range(8):
        channel._brpop_start(timeout=1)
    high, normal, low, stock = (
        "batchery\x06\x163",
        "batchery",
        "batchery\x06\x166",
        "batchery\x06\x169",
    )
    assert [args[1:-1] for args in sent] == (
        [(high, normal, low, stock)] * 2 + [(normal, low, stock, high)]
        + [(high, normal, low, stock)] * 3 + [(low, stock, normal, high)]
        + [(high, normal, low, stock)]
    )  # fmt: skip
    assert all(args[0] == "BRPOP" and args[-1] == 1 for args in sent)


def test_one_batch_in_eight_starts_with_normal_work_and_one_with_low() -> None:
    # Every priority always waiting: over 24 batches, which priority each one took.
    task = RecordingBatches(slots=1, batch_size=1)
    for i in range(24):
        for level in ("high", "normal", "low"):
            task._buffer.put_nowait(prioritized(f"{level}-{i}", 1, level))
    for _ in range(24):
        task._busy = 0
        task._do_flush()
    levels = [batch[0].split("-")[0] for batch in task.batches]
    assert [i + 1 for i, level in enumerate(levels) if level == "normal"] == [3, 11, 19]
    assert [i + 1 for i, level in enumerate(levels) if level == "low"] == [7, 15, 23]
    for start in range(len(levels) - 7):
        window = levels[start : start + 8]
        assert (window.count("high"), window.count("normal"), window.count("low")) == (6, 1, 1)


def test_a_batch_whose_turn_is_lower_work_takes_high_work_when_none_waits() -> None:
    # The share is "when some is waiting": with only high work, every batch is high work.
    task = RecordingBatches(slots=1, batch_size=1)
    for i in range(8):
        task._buffer.put_nowait(prioritized(f"high-{i}", 1, "high"))
    for _ in range(8):
        task._busy = 0
        task._do_flush()
    assert [b[0] for b in task.batches] == [f"high-{i}" for i in range(8)]


def test_a_version_with_a_budget_of_its_own_is_cut_to_it(monkeypatch: Any) -> None:
    """A version published with --batch-budget-ms: its pool process reports the budget, and
    the next batches of jobs naming it are cut to that, not to the workers' budget."""
    task, pool = pooled(monkeypatch, slots=1, batch_size=64, budget_s=0.025)
    photos = [Job(f"p-{i}", b"x" * 3000, model="photo") for i in range(64)]
    request = Delivered(id="photos", fate=None, _payload=((), jobs_to_kwargs(photos), {}),
                        delivery_info={"priority": PRIORITIES["normal"]})  # fmt: skip
    task._buffer.put_nowait(request)
    task._do_flush()
    assert len(pool.jobs(0)) == 1  # not measured yet
    pool.batches[0]["callback"](("stored", 0.050, False, [["photo", None, 0.2]]))
    assert len(pool.jobs(1)) == 4  # 50 ms a photo: 4 fit in 200 ms, none in 25 ms but one
    assert task.budgets == {("photo", None): 0.2}


def test_a_whole_message_is_settled_with_its_results_not_by_the_main_process(
    monkeypatch: Any,
) -> None:
    task, pool = pooled(monkeypatch, slots=1, batch_size=64)
    struck: list[list[str]] = []
    task.settle_split = struck.append
    whole = delivered("whole", 10)
    task._buffer.put_nowait(whole)
    task._do_flush()
    assert [r.settle for r in pool.batches[0]["requests"]] == [True]
    pool.done(0)
    assert whole.fate == "acked" and struck == []


def test_a_worker_shutting_down_starts_no_batch_and_takes_no_message(monkeypatch: Any) -> None:
    """Celery's warm shutdown sets should_stop to EX_OK (0): still a reason to stop."""
    from celery.worker import state

    task, pool = pooled(monkeypatch, slots=2, batch_size=64)
    task._buffer.put_nowait(delivered("bulk", 256))
    task._do_flush()
    assert len(pool.batches) == 2
    monkeypatch.setattr(state, "should_stop", 0)
    pool.done(0)  # a pool process is free, work is buffered: nothing more starts
    assert len(pool.batches) == 2


def test_a_part_carries_its_own_jobs_only_to_its_pool_process() -> None:
    """Celery's request also keeps the message's kwargs (request_dict): a 64-job part of a
    256-job message must not pickle all 256 jobs for its pool process."""
    import pickle

    from celery import Celery
    from celery.contrib.testing.mocks import TaskMessage
    from celery.worker.request import Request

    from producer.wire import TASK_CLASSIFY
    from worker.batching import Held

    app = Celery("parts")

    @app.task(name=TASK_CLASSIFY)
    def task(requests: Any) -> None: ...

    jobs = [Job(f"job-{i}", b"\x89PNG" + bytes([i % 251]) * 300) for i in range(256)]
    message = TaskMessage(TASK_CLASSIFY, "bulk", kwargs=jobs_to_kwargs(jobs))
    message.delivery_info, message.properties = {"routing_key": "batchery", "priority": 0}, {}
    held = Held(Request(message, app=app, task=task, hostname="here"))
    whole = len(pickle.dumps(held.part(0, 256)))
    parts = [pickle.loads(pickle.dumps(held.part(i, i + 64))) for i in range(0, 256, 64)]
    assert [job_ids_in(p.kwargs) for p in parts] == [
        [f"job-{i}" for i in range(s, s + 64)] for s in range(0, 256, 64)
    ]
    for i in range(0, 256, 64):
        assert len(pickle.dumps(held.part(i, i + 64))) < whole / 4 + 2048
