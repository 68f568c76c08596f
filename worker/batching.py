"""Dynamic batching on top of celery-batches: full batches under load, no wait when idle.

celery-batches buffers task messages in the worker's main process and flushes them to the
pool every ``flush_every`` messages or ``flush_interval`` seconds. Batchery changes three
things:

- Batches are counted in jobs, not messages: a message may carry one job or a chunk of many.
  A flush hands one pool process up to ``batch_size`` jobs (at least one message).
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

import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from producer.wire import PRIORITIES, job_ids_in, priority_of, runs_alone

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


def _take_now(requests: list[Any]) -> None:
    """Before a freed pool process takes its next batch: the next message waiting in Redis
    (a high one first) now joins the buffer (see worker.transport.Channel.take_now)."""
    message: Any = getattr(requests[0], "message", None) if requests else None
    take = getattr(getattr(message, "channel", None), "take_now", None)
    if take is not None:
        try:
            take()
        except Exception:  # never cost a batch its acknowledgement
            log.exception("could not take the next message")


def _started(request: Any) -> None:
    """Tell the channel's QoS a message left the buffer (see worker.transport.WeighedQoS)."""
    message: Any = getattr(request, "message", None)
    started = getattr(getattr(getattr(message, "channel", None), "qos", None), "started", None)
    if started is not None:
        started(message.delivery_tag)


def unwrap(error: Any) -> Any:
    """The exception inside billiard's wrappers (ExceptionInfo, ExceptionWithTraceback)."""
    for attribute in ("exception", "exc"):
        error = getattr(error, attribute, error)
    return error


class DynamicBatches(Batches):
    """A celery-batches task whose batches follow the pool's load."""

    abstract = True

    #: Pool processes; set from the worker's concurrency when the task is created.
    pool_slots = 1
    #: Called with the job ids of a batch whose pool process died (set by the app).
    on_worker_lost: Callable[[list[str]], None] | None = None
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
        # A request taken from the buffer that must start the next batch (see _next_batch).
        # Buffered requests by priority, in arrival order within each (see _next_batch).
        self._waiting: dict[str, deque[Any]] = {level: deque() for level in PRIORITIES}
        self._batches = 0
        self._timer: Any = None
        # Message id -> failed tries here, for the pause before it is given back.
        self._tries: dict[str, int] = {}

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
            if self._busy == 0 or self._buffered_jobs() >= self.flush_every:
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
        while self._busy < self.pool_slots:
            batch = self._next_batch()
            if not batch:
                break
            self.flush(batch)
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

    def _next_batch(self) -> list[Any]:
        """Buffered requests for one batch: up to ``flush_every`` jobs, or one ``alone``.

        One priority a batch, higher first, except one batch in eight that takes normal work
        and one that takes low work, when there is some: lower work is never starved.
        """
        while not self._buffer.empty():
            request = self._buffer.get_nowait()
            self._waiting[request_priority(request)].append(request)
        order = BATCH_SHARE.get((self._batches + 1) % 8, BATCH_ORDER)
        batch: list[Any] = []
        jobs = 0
        # One priority a batch: a high job never waits for bulk work batched with it.
        waiting = next((self._waiting[level] for level in order if self._waiting[level]), None)
        while waiting and jobs < self.flush_every:
            if runs_alone(request_kwargs(waiting[0])):
                if not batch:
                    batch.append(waiting.popleft())
                break  # an alone one makes a batch by itself
            request = waiting.popleft()
            batch.append(request)
            jobs += jobs_in(request)
        self._batches += bool(batch)
        return batch

    def _buffered_jobs(self) -> int:
        # The buffer holds at most the prefetch count of messages: a short sum.
        waiting = [r for level in self._waiting.values() for r in level]
        return sum(jobs_in(request) for request in waiting + list(self._buffer.queue))

    def flush(self, requests: Collection[Any]) -> Any:
        """Hand the requests to a pool process; ack on success, requeue on failure."""
        requests = list(requests)
        generation = self._generation
        self._busy += 1
        finished = False
        started = time.monotonic()

        def finish(ok: bool, reason: str, died: bool = False) -> None:
            nonlocal finished
            if finished:  # a lost process may be reported after its result
                return
            finished = True
            if generation != self._generation:
                return  # from before a consumer restart: its messages were given back
            self._busy -= 1
            runtime = time.monotonic() - started
            if ok:
                for request in requests:
                    self._tries.pop(request.id, None)
                    request.acknowledge()
                    self._event("task-succeeded", request.id, result=repr(BATCH_DONE),
                                runtime=runtime)  # fmt: skip
            else:
                pause = 0.0 if died else self._pause(requests)
                log.error("batch of %d messages requeued%s: %s", len(requests),
                          f" in {pause:g} s" if pause else "", reason)  # fmt: skip
                self._requeue(requests, reason, pause)
            _take_now(requests)
            self._do_flush()

        def on_return(result: Any) -> None:
            finish(result == BATCH_DONE, f"the batch function returned {result!r}")

        def on_error(error: Any) -> None:
            exc = unwrap(error)
            died = isinstance(exc, (WorkerLostError, TimeLimitExceeded))
            if died and self.on_worker_lost is not None:
                ids = [jid for request in requests for jid in job_ids_in(request_kwargs(request))]
                try:
                    self.on_worker_lost(ids)
                except Exception:
                    log.exception("could not count the death of the batch's worker")
            finish(False, f"{type(exc).__name__}: {exc}", died)

        serializable = ([SimpleRequest.from_request(r) for r in requests],)
        result = self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            callback=on_return,
            error_callback=on_error,
            timeout=self.time_limit,
        )
        for request in requests:
            self._event("task-started", request.id)
            _started(request)
        return result

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
