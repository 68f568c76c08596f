"""Messages the worker will not run: dropped, logged without their bodies, their jobs failed.

Celery's consumer refuses much of what it can't run (a content type off the accept list, a
body that does not decode, an unknown task name) and survives it, but a message of the wrong
shape (a list for a task name, a body that is not a triple) raises out of it and stops the
worker. And it logs up to a kilobyte of the body (a job's image, in our messages) and leaves the job
PENDING forever, or, for an unknown task, stores Celery's own exception format. Batchery's
consumer logs what the message was and why it was refused, never its body, and stores a
FAILURE result saying why for every job id it can read: the task id in the headers, and
the job ids in a body that decodes under the accepted content types (never anything else:
a pickle body is not even looked at).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.consumer import Consumer

from producer.errors import InvalidJobError
from producer.settings import Settings
from producer.signing import CONTENT_TYPE as SIGNED_CONTENT_TYPE
from producer.wire import (
    MAX_JOB_ID_CHARS,
    TASK_CLASSIFY,
    JobResult,
    bounded,
    check_job_id,
    excerpt,
    job_ids_in,
)
from worker.tasks import store_results

log = logging.getLogger(__name__)


def readable_job_ids(message: Any) -> list[str]:
    """The job ids a refused message names, read as safely as Celery reads anything."""
    ids: list[str] = []
    headers = message.headers if isinstance(message.headers, dict) else {}
    if isinstance(headers.get("id"), str):
        ids.append(headers["id"])
    try:
        # Decoded under the consumer's accept list: a forbidden content type raises here.
        body = message.decode()
        if isinstance(body, (list, tuple)) and len(body) == 3:
            ids += job_ids_in(body[1])
    except Exception:  # an undecodable body names no jobs
        pass
    return [jid for jid in dict.fromkeys(ids) if _valid_id(jid)]


def _valid_id(value: Any) -> bool:
    try:
        check_job_id(value)
    except InvalidJobError:
        return False
    return True


def describe(message: Any) -> str:
    """What a message was, for the log: its type, task and id, never its body."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task = headers.get("task")
    job = headers.get("id")
    return (
        f"message (content type {excerpt(message.content_type)}, task {excerpt(task)}, "
        f"id {excerpt(job, MAX_JOB_ID_CHARS)}, {len(message.body or b'')} bytes)"
    )


def refusing_consumer(
    settings: Settings, connect: Callable[[Settings], redis.Redis]
) -> type[Consumer]:
    """Celery's consumer class, with Batchery's refusals; ``connect`` makes a Redis client."""

    class RefusingConsumer(Consumer):
        """Celery's consumer, refusing quietly and failing the jobs it can name."""

        _results: redis.Redis | None = None

        def refuse(self, message: Any, reason: str) -> None:
            """Drop the message, log why (never its body), fail the jobs it names."""
            reason = bounded(reason)
            log.error("refused %s: %s", describe(message), reason)
            ids = readable_job_ids(message)
            try:
                if not message.acknowledged:
                    message.reject(requeue=False)
            except Exception:  # a lost channel gives the message back anyway
                log.exception("could not drop a refused message")
            headers = message.headers if isinstance(message.headers, dict) else {}
            message_id = headers.get("id")
            try:
                self._results = self._results or connect(settings)
                # Struck off the ledger at once: no sweep sends a refused message again.
                settled = [message_id] if isinstance(message_id, str) else []
                failures = [JobResult.failure(jid, f"message refused: {reason}") for jid in ids]
                store_results(self._results, settings.queue, failures, settings.result_ttl_s,
                              settled=settled, batch=False)  # fmt: skip
            except redis.RedisError as exc:
                log.warning("could not store the refusal of %d jobs: %s", len(ids), exc)

        def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
            handle = super().create_task_handler(*args, **kwargs)
            lost = tuple(self.connection_errors) + tuple(self.channel_errors)

            def on_task_received(message: Any) -> None:
                # Celery trusts a message's shape (a list for a task name, a body that is not
                # (args, kwargs, embed)): what it raises would stop the whole worker, and the
                # message, redelivered, would stop the next one.
                headers = message.headers
                if headers is not None and not (
                    isinstance(headers, dict)
                    and isinstance(headers.get("task"), str)
                    and _valid_id(headers.get("id"))
                ):
                    self.refuse(message, "headers without a task name and a job id")
                    return
                try:
                    handle(message)
                except lost:
                    raise
                except Exception as exc:
                    self.refuse(message, f"malformed message ({type(exc).__name__}: {exc})")

            return on_task_received

        def on_decode_error(self, message: Any, exc: Exception) -> None:
            if message.content_type == SIGNED_CONTENT_TYPE:
                # Celery 5.6 reports a bad signature as a TypeError (its reraise_errors
                # catches a module, not an exception class): still refused, named plainly.
                self.refuse(message, f"signature check failed ({type(exc).__name__}: {exc})")
                return
            self.refuse(message, f"cannot read its body ({type(exc).__name__}: {exc})")

        def on_unknown_message(self, body: Any, message: Any) -> None:
            self.refuse(message, "not a Celery task message")

        def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
            task = message.headers.get("task") if isinstance(message.headers, dict) else None
            self.refuse(
                message, f"unknown task {excerpt(task)}; this worker runs {TASK_CLASSIFY!r}"
            )

        def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
            self.refuse(message, f"invalid task message ({type(exc).__name__}: {exc})")

    return RefusingConsumer
