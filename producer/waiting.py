"""Waiting for results on the sync side: one helper behind ``Client.result``, ``Client.results``
and ``batchery classify``'s collector (the gateway's async side has ``gateway/waiter.py``).

Two ways to wait, both here:

- **One job** (``Waiter.one``): subscribe to its key's channel (Celery's backend and
  Batchery's workers publish each result as they store it) and wake when it comes: a lone
  job's answer is seen within a round trip, not at the next poll.
- **Many jobs** (``Waiter.look`` and ``Pace``): a thousand subscriptions would cost more than
  the answers, so look with MGET, paced by the rate answers have come so far: a look should
  find about a sixteenth of the jobs in flight, not a few each time, and twice as long a
  pause each time a look finds none. ``Waiter.many`` loops those two for ``Client.results``;
  ``classify`` calls them between pushes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis

from producer.wire import result_key

T = TypeVar("T")


class ResultReader(Protocol):
    """What a waiter needs of a client (``producer.client.Client`` is one)."""

    @property
    def redis(self) -> redis.Redis: ...

    def fetch(
        self, job_ids: Sequence[str], forget: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]]: ...

    def retrying(self, call: Callable[[], T]) -> T: ...


#: Jobs' result keys read by one MGET: bounded replies, however many jobs are waited on.
MGET_KEYS = 1000


class Pace:
    """How long to pause before the next look for many jobs' answers.

    ``first`` after a look that found answers at a high rate, up to ``most`` after looks that
    found none (doubling each time), and in between the time about a sixteenth of the jobs in
    flight should take to be answered at the rate answers have come since ``start()``.
    """

    def __init__(self, first: float = 0.0005, most: float = 0.05) -> None:
        self.first, self.most = first, most
        self.pause = first
        self.answers = 0
        self.since = 0.0

    def start(self) -> None:
        """Mark the first push: answers are counted from here."""
        self.since = self.since or time.monotonic()

    @staticmethod
    def goal(in_flight: int) -> int:
        """Answers a look should find: about a sixteenth of the jobs in flight."""
        return max(1, in_flight // 16)

    def record(self, found: int, in_flight: int) -> None:
        """Count a look's ``found`` answers, ``in_flight`` jobs still waiting after it."""
        if found:
            self.answers += found
            self.start()
            rate = self.answers / max(time.monotonic() - self.since, self.first)
            self.pause = min(max(self.goal(in_flight) / rate, self.first), self.most)

    def wait(self, found: int, in_flight: int, limit: float = float("inf")) -> None:
        """Pause before the next look (at most ``limit`` s), unless the last look found its
        goal or nothing is in flight; twice as long next time if it found nothing."""
        if not in_flight or found >= self.goal(in_flight):
            return
        time.sleep(max(0.0, min(self.pause, limit)))
        if not found:
            self.pause = min(self.pause * 2, self.most)


class Waiter:
    """Waits for a client's results (one per :class:`~producer.client.Client`)."""

    def __init__(self, client: ResultReader) -> None:
        self.client = client
        self._local = threading.local()  # each waiting thread's subscriber connection

    def one(self, job_id: str, deadline: float) -> bytes | str | None:
        """The stored result of ``job_id``, raw, once written; None at ``deadline``."""
        return self.client.retrying(lambda: self._subscribe_and_wait(result_key(job_id), deadline))

    def look(
        self, waiting: Sequence[str], step: int = 1, forget: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]]:
        """The answers stored among ``waiting`` (oldest first), read by MGET.

        ``step`` 1 reads every job: an exact snapshot. ``step`` N > 1 probes every N-th and
        then reads the jobs up to the last probe answered: answers come a batch at a time,
        roughly in the order jobs were pushed, so two short MGETs find what a long one would.
        ``forget``: result keys deleted in the same round trip (rows already written).
        """
        fetch = self.client.fetch
        if step <= 1:
            found: dict[str, dict[str, Any]] = fetch(waiting[:MGET_KEYS], forget)
            for start in range(MGET_KEYS, len(waiting), MGET_KEYS):
                found.update(fetch(waiting[start : start + MGET_KEYS]))
            return found
        probe = list(waiting[::step])
        found = fetch(probe, forget)
        if found:
            last = max(i for i, key in enumerate(probe) if key in found) + 1
            found.update(fetch([k for k in waiting[: last * step] if k not in found]))
        return found

    def many(self, job_ids: Sequence[str], deadline: float) -> dict[str, dict[str, Any]]:
        """The answers of ``job_ids`` stored by ``deadline`` (all of them, if sooner)."""
        found: dict[str, dict[str, Any]] = {}
        waiting = list(dict.fromkeys(job_ids))
        pace = Pace(first=0.002, most=0.1)
        pace.start()
        while True:
            new = self.look(waiting)
            found.update(new)
            waiting = [jid for jid in waiting if jid not in new]
            pace.record(len(new), len(waiting))
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return found
            pace.wait(len(new), len(waiting), remaining)

    def close(self) -> None:
        """Close this thread's subscriber connection, if it has one."""
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is not None:
            pubsub.close()
            self._local.pubsub = None

    def _subscribe_and_wait(self, key: str, deadline: float) -> bytes | str | None:
        # Each thread keeps one subscriber connection open across calls: connecting per call
        # would cost more than the wait.
        redis_client: redis.Redis = self.client.redis
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self._local.pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        channel = key.encode()
        try:
            pubsub.subscribe(key)
        except redis.ConnectionError:
            self._local.pubsub = None  # a Redis restart broke it: the retry takes a new one
            raise
        try:
            # Subscribed first, read second: a result written in between is not missed.
            raw = redis_client.get(key)
            while raw is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                message = pubsub.get_message(timeout=min(remaining, 1.0))
                if message and message.get("type") == "message":
                    if message.get("channel") == channel:
                        raw = message["data"]
                elif message is None:
                    # A writer that does not publish is still seen, once a second.
                    raw = redis_client.get(key)
            return raw
        except redis.ConnectionError:
            self._local.pubsub = None
            raise
        finally:
            if self._local.pubsub is not None:
                pubsub.unsubscribe(key)
