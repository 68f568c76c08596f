"""Celery's prefork pool, with a warm shutdown that waits for every batch a pool process has.

At a warm shutdown (Ctrl-C, SIGTERM) Celery closes the pool, then the consumer, whose close
"flushes" the pool (celery 5.6, billiard 4.3): while the pool runs (a lost broker connection)
that flush finishes the task payloads it has begun to write to pool processes; once the
pool is closed it only drops every task a process has not yet acknowledged, written or
not. Two ways that strands a busy worker (one Ctrl-C in four, here):

- A batch's task is often larger than a pipe holds (232 KB seen for 64 digits), so it is
  written in pieces from the event loop, which has stopped. The pool then writes the
  process its "stop" sentinel after half a payload; the process reads the sentinel as part
  of the payload and waits for the rest for ever, and the worker's join with it.
- A task written whole but dropped is still run by its process, whose answer the pool no
  longer waits for: it stops draining answers, and the process waits 30 s for its answer to
  be read before it exits.

So in a closed pool this flush drops only the tasks not yet begun (their messages, never
acknowledged, go back to the queue, as Celery leaves them), finishes the writes begun, and
keeps what was written: the pool drains their answers while it joins its processes.
"""

from __future__ import annotations

import inspect
import logging

from billiard.pool import CLOSE
from celery.concurrency import asynpool, prefork

log = logging.getLogger(__name__)


class AsynPool(asynpool.AsynPool):
    """Celery's pool; its flush in a closed pool keeps what a process was sent."""

    def flush(self) -> None:
        if self._state != CLOSE:  # running (a lost connection) or terminating: Celery's own
            super().flush()
            return
        finished = 0
        for job in tuple(self._cache.values()):
            if job._accepted:
                continue
            proc = getattr(job, "_write_to", None)
            if proc is None:  # not begun: its message goes back to the queue
                if self.synack:
                    job._cancel()
                else:
                    job.discard()
                continue
            ref = getattr(job, "_writer", None)
            writer = ref() if ref is not None else None
            begun = writer is not None and inspect.getgeneratorstate(writer) == "GEN_SUSPENDED"
            if begun and proc._is_alive():
                self._flush_writer(proc, writer)  # until the process has read it all
                finished += 1
        self.outbound_buffer.clear()
        if finished:
            log.info("shutdown: finished sending %d batches to pool processes", finished)


class TaskPool(prefork.TaskPool):
    """The prefork pool with the flush above (``worker_pool``)."""

    Pool = AsynPool
