"""Dynamic batching on top of celery-batches: full batches under load, no wait when idle.

celery-batches buffers task messages in the worker's main process and flushes them to the
pool every ``flush_every`` messages or ``flush_interval`` seconds. Batchery changes three
things:

- Batches are cut to a time budget (``budget_s``, see ``worker.budget``), and counted in jobs,
  not messages: a flush hands one pool process about ``budget_s`` seconds of work, at most
  ``batch_size`` jobs and at least one. A message may carry one job or a chunk of 256, and
  its jobs may be spread over several batches and pool processes (:class:`Held`): it is
  acknowledged once every one of its jobs' results is stored, and given back whole if any
  of its batches failed (a job already answered is skipped when it comes again).
- A message arriving at an idle worker is flushed at once: a lone job never waits for a batch
  that will not fill. While some pool processes are busy, the buffer fills until
  ``batch_size`` jobs or ``batch_wait_ms`` pass; while all are busy, it fills until one is
  free, which then takes the next batch at once.
- A message marked ``alone`` (a job whose worker died, sent back by itself) makes a batch of
  its own: merged with others it would be sent back again, and could take them down.
- Buffered messages are batched by priority, high first (one batch in eight starts with
  normal work, one with low, when some waits): a high job that arrives behind buffered
  bulk work goes in the next batch.
- Task events (received, started, succeeded; retried when requeued) are sent per message,
  as Celery's own strategy sends them, so Flower and ``celery events`` see the tasks;
  celery-batches sends none.
- Messages are acknowledged only after their batch has stored its results (celery-batches
  acks them regardless, leaving their jobs PENDING forever if the batch fails).
- A batch whose pool process died, or that ran past ``time_limit`` seconds (its process is
  then killed: a decoder that hangs can't stall the worker), is requeued at once, and the
  death counted against each of its jobs: that is how poison jobs are found and isolated
  (see ``worker.tasks``). The batch function answers every job whatever else goes wrong,
  so the only other failure is Redis refusing its results: that batch is given back after
  a pause that doubles with each try of the same message (1 s up to 30 s), so a worker
  never spins on a message it can't finish.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from producer.wire import MAX_JOBS_PER_MESSAGE, PRIORITIES, job_ids_in, priority_of, runs_alone
from worker.budget import CostModel, Cut, Kind, kind_of

log = logging.getLogger(__name__)

#: What the batch function returns once it has stored every result of its batch.
BATCH_DONE = "stored"


def request_kwargs(request: Any) -> Any:
    """A buffered Celery request's kwargs (None if they can't be read)."""
    try:
        _, kwargs, _ = request._payload
        return kwargs
    except (TypeError, ValueError, AttributeError):
        return None


def jobs_in(request: Any) -> int:
    """How many jobs a buffered Celery request carries (1 if it can't be read)."""
    kwargs = request_kwargs(request)
    jobs = kwargs.get("jobs") if isinstance(kwargs, dict) else None
    return max(1, len(jobs)) if isinstance(jobs, list) else 1


def request_priority(request: Any) -> str:
    """A buffered Celery request's priority (``normal`` if it can't be read)."""
    info = getattr(request, "delivery_info", None)
    return priority_of(info.get("priority") if isinstance(info, dict) else None)


#: The order priorities are batched in, and the batches (of eight) that start lower.
BATCH_ORDER = ("high", "normal", "low")
BATCH_SHARE = {3: ("normal", "low", "high"), 7: ("low", "normal", "high")}


def stopping() -> bool:
    """Whether the worker is shutting down (a first Ctrl-C or SIGTERM: Celery's warm shutdown).

    Then no new batch starts and no message is taken: what is buffered goes back to the
    queue as the worker exits, and the batches running finish. Without this, a worker busy
    with split messages kept taking work (each finished batch took the next message) and
    its warm shutdown outlasted its soft-shutdown timeout.
    """
    from celery.worker import state  # its flags: EX_OK (0) is a reason to stop too

    return any(flag is not None and flag is not False
               for flag in (state.should_stop, state.should_terminate))  # fmt: skip


def _take_now(request: Any, high_waiting: bool) -> None:
    """Before a freed pool process takes its next batch: the next message waiting in Redis
    (a high one first) now joins the buffer (see worker.transport.Channel.take_now).

    Within prefetch, by the same rule as a poll. Past it (a message split over batches
    leaves the buffer a part at a time), a high message only, and only when no high work
    is buffered: a high job still goes in the next batch, and the buffer stays bounded.
    """
    message: Any = getattr(request, "message", None)
    channel: Any = getattr(message, "channel", None)
    take = getattr(channel, "take_now", None)
    if take is None or stopping():
        return
    try:
        qos = getattr(channel, "qos", None)
        if qos is None or qos.can_consume():
            take()
        elif not high_waiting:
            take(high_only=True)
    except Exception:  # never cost a batch its acknowledgement
        log.exception("could not take the next message")


def _started(request: Any, jobs: int | None = None) -> None:
    """Tell the channel's QoS that ``jobs`` of a message's jobs (None: all that are left)
    left the buffer for a pool process (see worker.transport.WeighedQoS)."""
    message: Any = getattr(request, "message", None)
    started = getattr(getattr(getattr(message, "channel", None), "qos", None), "started", None)
    if started is not None:
        started(message.delivery_tag, jobs)


def unwrap(error: Any) -> Any:
    """The exception inside billiard's wrappers (ExceptionInfo, ExceptionWithTraceback)."""
    for attribute in ("exception", "exc"):
        error = getattr(error, attribute, error)
    return error


#: The kind given to a message whose jobs can't be read or split: it goes whole, and the
#: batch function refuses it.
UNREADABLE: Kind = (None, None, False, "unreadable")


class Held:
    """A message in the worker's hands, its jobs handed to pool processes a slice at a time.

    ``taken`` jobs have gone to batches, ``running`` of which have not finished. It is
    settled (acknowledged, or given back whole) once nothing of it runs and either every job
    was taken or one of its batches failed.
    """

    __slots__ = ("alone", "died", "failure", "jobs", "kinds", "parts", "priority", "request",
                 "running", "size", "started_at", "taken")  # fmt: skip

    def __init__(self, request: Any) -> None:
        self.request = request
        kwargs = request_kwargs(request)
        jobs = kwargs.get("jobs") if isinstance(kwargs, dict) else None
        self.alone = runs_alone(kwargs)
        # A message over the jobs limit is refused whole: split, its parts would pass.
        splittable = isinstance(jobs, list) and 0 < len(jobs) <= MAX_JOBS_PER_MESSAGE
        self.jobs: list[Any] | None = jobs if splittable and not self.alone else None
        self.kinds = [kind_of(job) for job in self.jobs] if self.jobs else [UNREADABLE]
        self.size = len(self.kinds)
        self.priority = request_priority(request)
        self.taken = 0
        self.running = 0
        self.parts = 0
        self.failure: str | None = None
        self.died = False
        self.started_at: float | None = None

    @property
    def left(self) -> int:
        """Jobs not yet handed to a batch."""
        return self.size - self.taken

    def part(self, start: int, end: int) -> SimpleRequest:
        """The request a pool process gets for jobs ``start:end`` of this message."""
        simple = SimpleRequest.from_request(self.request)
        if self.jobs is not None and (start, end) != (0, self.size):
            simple.kwargs = {**simple.kwargs, "jobs": self.jobs[start:end]}
            # Celery's request_dict holds the whole message's kwargs too: left there, every
            # part would carry (and pickle to its pool process) all of the message's jobs.
            simple.request_dict = {**(simple.request_dict or {}), "kwargs": simple.kwargs}
        # Read by worker.tasks: a whole message is struck off the ledger (and its jobs off the
        # backlog) with its results; a split one by the main process once every part is
        # stored (DynamicBatches.settle_split): its last part to start may finish first.
        simple.settle = (start, end) == (0, self.size)
        return simple


class DynamicBatches(Batches):
    """A celery-batches task whose batches follow the pool's load and a time budget."""

    abstract = True

    #: Pool processes; set from the worker's concurrency when the task is created.
    pool_slots = 1
    #: Seconds of work a batch is cut to (0: counted in jobs only); see worker.budget.
    budget_s = 0.0
    #: Called with the job ids of a batch whose pool process died (set by the app).
    on_worker_lost: Callable[[list[str]], None] | None = None
    #: Called with a split message's id once all its parts are stored, before its ack:
    #: strikes it off the ledger and its jobs off the backlog (set by the app).
    settle_split: Callable[[list[str]], None] | None = None
    #: Seconds a batch may run before its pool process is killed (None: no limit).
    time_limit: float | None = None
    _tref: Any  # celery-batches' flush timer

    #: Pause before a failed batch's messages go back to the queue: doubling, capped.
    RETRY_PAUSE_S = (1.0, 30.0)

    def __init__(self) -> None:
        super().__init__()
        self._eventer: Any = None
        self._busy = 0
        self._generation = 0
        # Held messages by priority, in arrival order within each (see _next_batch); the
        # first of a list may be partly taken.
        self._waiting: dict[str, deque[Held]] = {level: deque() for level in PRIORITIES}
        self._batches = 0
        self._timer: Any = None
        # Message id -> failed tries here, for the pause before it is given back.
        self._tries: dict[str, int] = {}
        self.costs = CostModel()
        # (model, version) as jobs name them -> that version's own budget (its manifest's
        # batch_budget_ms, reported by the pool processes that ran it).
        self.budgets: dict[tuple[Any, Any], float] = {}

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Callable[..., None]:
        """Wrap celery-batches' message handler with the flush-when-idle rule.

        Celery calls this again each time the consumer restarts (after a lost broker
        connection). The restart drops the pool's unsent batches without a callback, and kombu
        gives every unacknowledged message back to the queue, so the old buffer and busy
        count are void: start afresh, and ignore callbacks of batches from before.
        """
        self._generation += 1
        self._busy = 0
        for waiting in self._waiting.values():
            waiting.clear()
        while not self._buffer.empty():
            self._buffer.get_nowait()
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        buffer_message = super().Strategy(task, app, consumer)
        self._timer = consumer.timer
        eventer = consumer.event_dispatcher
        self._eventer = eventer if eventer is not None and eventer.enabled else None

        def on_message(message: Any, *args: Any, **kwargs: Any) -> None:
            buffer_message(message, *args, **kwargs)
            if self._busy == 0 or self._batch_ready():
                self._do_flush()
            # After the flush: an event is a Redis round trip, kept off a lone job's path.
            headers = message.headers
            if self._eventer is not None and isinstance(headers, dict):
                self._event(
                    "task-received", headers.get("id"), name=headers.get("task"),
                    args=headers.get("argsrepr"), kwargs=headers.get("kwargsrepr"),
                    root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
                    retries=headers.get("retries", 0), eta=None, expires=None,
                )  # fmt: skip

        return on_message

    def _do_flush(self) -> None:
        """Give free pool processes a batch each (called on messages, timer and completions)."""
        while self._busy < self.pool_slots and not stopping():
            parts = self._next_batch()
            if not parts:
                break
            self._run(parts)
        if self._buffer.empty() and not any(self._waiting.values()) and self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _event(self, kind: str, task_id: Any, **fields: Any) -> None:
        """Send a task event; a monitoring hiccup must never cost a batch."""
        if self._eventer is None:
            return
        try:
            self._eventer.send(kind, uuid=task_id, **fields)
        except Exception as exc:
            log.warning("task event %s not sent: %s", kind, exc)

    def _hold_buffered(self) -> None:
        while not self._buffer.empty():
            held = Held(self._buffer.get_nowait())
            self._waiting[held.priority].append(held)

    def _next_batch(self) -> list[tuple[Held, int, int]]:
        """Parts of held messages for one batch: about ``budget_s`` of work, at most
        ``flush_every`` jobs, at least one; or one ``alone`` message by itself.

        One priority a batch, higher first, except one batch in eight that takes normal work
        and one that takes low work, when there is some: lower work is never starved.
        """
        self._hold_buffered()
        order = BATCH_SHARE.get((self._batches + 1) % 8, BATCH_ORDER)
        # One priority a batch: a high job never waits for bulk work batched with it.
        waiting = next((self._waiting[level] for level in order if self._waiting[level]), None)
        budget = self.budget_s
        if waiting and self.budgets:  # the first job's version may have a budget of its own
            model, version, *_ = waiting[0].kinds[waiting[0].taken]
            budget = self.budgets.get((model, version), budget)
        cut = Cut(self.costs, budget, self.flush_every)
        parts: list[tuple[Held, int, int]] = []
        while waiting and not cut.closed:
            held = waiting[0]
            if held.alone:
                if not parts:  # an alone one makes a batch by itself
                    parts.append((held, 0, held.size))
                    held.taken = held.size
                    waiting.popleft()
                break
            start = end = held.taken
            while end < held.size and cut.fits(held.kinds[end]):
                end += 1
            if end > start:
                parts.append((held, start, end))
                held.taken = end
            if held.taken == held.size:
                waiting.popleft()
        self._batches += bool(parts)
        return parts

    def _batch_ready(self) -> bool:
        """Whether the buffer holds a whole batch: ``flush_every`` jobs or a budget's work."""
        self._hold_buffered()
        jobs = 0
        seconds = 0.0
        for waiting in self._waiting.values():
            for held in waiting:
                jobs += held.left
                cost = self.costs.per_job(held.kinds[-1], min(held.left, self.flush_every))
                if cost is None:
                    return True  # an unknown kind goes alone: nothing to wait for
                seconds += held.left * cost
                if jobs >= self.flush_every or (self.budget_s and seconds >= self.budget_s):
                    return True
        return False

    def _buffered_jobs(self) -> int:
        """Jobs in the worker's hands not yet handed to a pool process."""
        self._hold_buffered()
        return sum(held.left for waiting in self._waiting.values() for held in waiting)

    def flush(self, requests: Collection[Any]) -> Any:
        """celery-batches' entry point: these whole messages as one batch."""
        parts = [(held, 0, held.size) for held in map(Held, requests)]
        for held, _, _ in parts:
            held.taken = held.size
        return self._run(parts)

    def _run(self, parts: list[tuple[Held, int, int]]) -> Any:
        """Hand the parts to a pool process; settle each message once all of it is done."""
        generation = self._generation
        self._busy += 1
        finished = False
        started = time.monotonic()
        held_here = list(dict.fromkeys(held for held, _, _ in parts))
        counts: dict[Kind, int] = {}
        for held, start, end in parts:
            for kind in held.kinds[start:end]:
                counts[kind] = counts.get(kind, 0) + 1
        requests = [held.part(start, end) for held, start, end in parts]

        def finish(ok: bool, reason: str, died: bool = False) -> None:
            nonlocal finished
            if finished:  # a lost process may be reported after its result
                return
            finished = True
            if generation != self._generation:
                return  # from before a consumer restart: its messages were given back
            self._busy -= 1
            for held in held_here:
                held.running -= 1
                if not ok and held.failure is None:
                    held.failure, held.died = reason, died
                self._settle(held)
            _take_now(held_here[0].request, bool(self._waiting["high"]))
            self._do_flush()

        def on_return(result: Any) -> None:
            done = isinstance(result, tuple) and len(result) == 4 and result[0] == BATCH_DONE
            if done and not result[2]:
                self.costs.observe(counts, float(result[1]))
            if done:
                for model, version, budget in result[3]:
                    self.budgets[(model, version)] = budget
            finish(done, f"the batch function returned {result!r}")

        def on_error(error: Any) -> None:
            exc = unwrap(error)
            died = isinstance(exc, (WorkerLostError, TimeLimitExceeded))
            if died and self.on_worker_lost is not None:
                ids = [jid for held, start, end in parts for jid in job_ids_in(
                    request_kwargs(held.request) if held.jobs is None
                    else {"jobs": held.jobs[start:end]})]  # fmt: skip
                try:
                    self.on_worker_lost(ids)
                except Exception:
                    log.exception("could not count the death of the batch's worker")
            finish(False, f"{type(exc).__name__}: {exc}", died)

        result = self._pool.apply_async(
            apply_batches_task,
            (self, (requests,), 0, None),
            callback=on_return,
            error_callback=on_error,
            timeout=self.time_limit,
        )
        for held, start, end in parts:
            held.running += 1
            held.parts += 1
            if held.started_at is None:
                held.started_at = started
                self._event("task-started", held.request.id)
            _started(held.request, None if held.taken == held.size else end - start)
        return result

    def _settle(self, held: Held) -> None:
        """Acknowledge a message whose jobs are all stored, or give back one whose batch
        failed, once none of its parts is running."""
        if held.failure is not None and held.left:
            # The jobs not taken yet go back with the message: none of them starts now.
            with contextlib.suppress(ValueError):
                self._waiting[held.priority].remove(held)
            held.taken = held.size
        if held.running or held.left:
            return
        request = held.request
        if held.failure is None:
            self._tries.pop(request.id, None)
            if held.parts > 1 and self.settle_split is not None:
                try:
                    self.settle_split([request.id])
                except Exception:  # the ledger's sweep finds it answered later: no harm
                    log.exception("could not strike a split message off the ledger")
            request.acknowledge()
            runtime = time.monotonic() - (held.started_at or time.monotonic())
            self._event("task-succeeded", request.id, result=repr(BATCH_DONE), runtime=runtime)
            return
        pause = 0.0 if held.died else self._pause([request])
        log.error("message of %d jobs requeued%s: %s", held.size,
                  f" in {pause:g} s" if pause else "", held.failure)  # fmt: skip
        self._requeue([request], held.failure, pause)

    def _pause(self, requests: list[Any]) -> float:
        """Seconds to wait before giving these messages back: doubling with their tries."""
        tries = 0
        for request in requests:
            tries = max(tries, self._tries.get(request.id, 0) + 1)
            if len(self._tries) < 100_000:
                self._tries[request.id] = tries
        first, cap = self.RETRY_PAUSE_S
        return float(min(cap, first * 2 ** (tries - 1)))

    def _requeue(self, requests: list[Any], reason: str, pause: float) -> None:
        """Give the messages back to the queue, now or after ``pause`` seconds."""

        def give_back() -> None:
            for request in requests:
                try:
                    request.reject(requeue=True)
                except Exception:  # a lost connection gives it back anyway
                    log.exception("could not give a message back")
                self._event("task-retried", request.id, exception=reason, traceback="")

        if pause and self._timer is not None:
            self._timer.call_after(pause, give_back)
        else:
            give_back()
