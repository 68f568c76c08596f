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
- Messages are acknowledged only after their batch has stored its results. A batch that
  raised, or whose pool process died, is rejected and requeued (celery-batches acks it
  regardless, leaving its jobs PENDING forever).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from queue import Empty
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

log = logging.getLogger(__name__)

#: What the batch function returns once it has stored every result of its batch.
BATCH_DONE = "stored"


def jobs_in(request: Any) -> int:
    """How many jobs a buffered Celery request carries (1 if it can't be read)."""
    try:
        _, kwargs, _ = request._payload
        return max(1, len(kwargs["jobs"]))
    except (TypeError, KeyError, ValueError, AttributeError):
        return 1


class DynamicBatches(Batches):
    """A celery-batches task whose batches follow the pool's load."""

    abstract = True

    #: Pool processes; set from the worker's concurrency when the task is created.
    pool_slots = 1
    _tref: Any  # celery-batches' flush timer

    def __init__(self) -> None:
        super().__init__()
        self._busy = 0

    def Strategy(self, task: Batches, app: Any, consumer: Any) -> Callable[..., None]:
        """Wrap celery-batches' message handler with the flush-when-idle rule."""
        buffer_message = super().Strategy(task, app, consumer)

        def on_message(*args: Any, **kwargs: Any) -> None:
            buffer_message(*args, **kwargs)
            if self._busy == 0 or self._buffered_jobs() >= self.flush_every:
                self._do_flush()

        return on_message

    def _do_flush(self) -> None:
        """Give free pool processes a batch each (called on messages, timer and completions)."""
        while self._busy < self.pool_slots:
            batch, jobs = [], 0
            while jobs < self.flush_every:
                try:
                    request = self._buffer.get_nowait()
                except Empty:
                    break
                batch.append(request)
                jobs += jobs_in(request)
            if not batch:
                break
            self.flush(batch)
        if self._buffer.empty() and self._tref is not None:
            self._tref.cancel()
            self._tref = None

    def _buffered_jobs(self) -> int:
        # The buffer holds at most the prefetch count of messages: a short sum.
        return sum(jobs_in(request) for request in list(self._buffer.queue))

    def flush(self, requests: Collection[Any]) -> Any:
        """Hand the requests to a pool process; ack on success, requeue on failure."""
        requests = list(requests)
        self._busy += 1
        finished = False

        def finish(ok: bool, reason: str) -> None:
            nonlocal finished
            if finished:  # a lost process may be reported after its result
                return
            finished = True
            self._busy -= 1
            for request in requests:
                if ok:
                    request.acknowledge()
                else:
                    request.reject(requeue=True)
            if not ok:
                log.error("batch of %d messages requeued: %s", len(requests), reason)
            self._do_flush()

        def on_return(result: Any) -> None:
            finish(result == BATCH_DONE, f"the batch function returned {result!r}")

        def on_error(exc: Any) -> None:
            finish(False, repr(getattr(exc, "exception", exc)))

        serializable = ([SimpleRequest.from_request(r) for r in requests],)
        return self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            callback=on_return,
            error_callback=on_error,
        )
