"""kombu's Redis transport, hardened and weighed: what a worker takes in is bounded.

- A message that is not a kombu envelope is dropped. kombu pops a message off the queue and
  parses it before Celery sees it; anything that is not JSON, or JSON without an envelope's
  shape (``properties`` not an object, a body that isn't base64), would raise out of kombu's
  event loop and stop the worker, and a restarted worker would meet the next one. Here it
  is logged (its length, never its content) and dropped: it was already popped, so nothing
  else is lost.
- A message over ``max_message_bytes`` is dropped before it is parsed, the same way.
- Prefetch is counted in jobs and bytes, not messages (:class:`WeighedQoS`): a worker holds
  at most ``prefetch_jobs`` jobs and ``prefetch_bytes`` bytes of messages waiting for a pool
  process (always at least one message), whether they come one job to a message or 256,
  besides the batches running.
- Priorities (``producer.wire.PRIORITIES``): each poll takes from the high list first, then
  normal, then low, except one poll in eight that looks at normal first and one that looks
  at low first, so lower work is never starved while higher work keeps coming. A worker
  full of other work takes the next message by the same rule as each batch finishes
  (``take_now``), so a waiting high job goes in the next batch.

It overrides kombu 5.7's ``Channel._brpop_read`` and ``QoS``; ``worker.compat`` refuses to
start on a kombu whose insides differ.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from producer.wire import PRIORITIES, jobs_in_headers

#: kombu priority numbers of the lists a worker reads, highest priority first (kombu's 9,
#: which only a stock Celery producer would use, is read as low).
HIGH, NORMAL, LOW = PRIORITIES["high"], PRIORITIES["normal"], PRIORITIES["low"]
TAKE_ORDER = (HIGH, NORMAL, LOW, 9)
#: In every eight polls, one looks at normal work first and one at low work first.
SHARE = {3: (NORMAL, LOW, 9, HIGH), 7: (LOW, 9, NORMAL, HIGH)}

# KEYS: lists in the order to take from. Pops the oldest message of the first non-empty one.
_POP_FIRST = """
for _, key in ipairs(KEYS) do
  local item = redis.call('RPOP', key)
  if item then return item end
end
return false
"""

log = logging.getLogger(__name__)


class WeighedQoS(kombu_redis.QoS):
    """kombu's Redis QoS, with prefetch bounded by the jobs and bytes the messages carry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._weights: dict[Any, tuple[int, int]] = {}
        self._jobs = 0
        self._bytes = 0

    def can_consume(self) -> bool:
        """Room for one more message: under the message count, the jobs and the bytes."""
        if not self._weights:
            return True
        channel = self.channel
        return bool(
            super().can_consume()
            and self._jobs < channel.prefetch_jobs
            and self._bytes < channel.prefetch_bytes
        )

    def can_consume_max_estimate(self) -> int | None:
        return 1 if self.can_consume() else 0

    def append(self, message: Any, delivery_tag: Any) -> None:
        weight = (jobs_in_headers(message.headers), len(message.body or ""))
        super().append(message, delivery_tag)
        self._weights[delivery_tag] = weight
        self._jobs += weight[0]
        self._bytes += weight[1]

    def started(self, delivery_tag: Any, jobs: int | None = None) -> None:
        """``jobs`` of the message's jobs (None: all that are left) left the buffer for a
        pool process: they no longer count. Its bytes count until all of them have left.

        What a worker holds is then its prefetch (jobs waiting in the buffer) plus the
        batches running (one per pool process), and a poll can take the next message, high
        ones first, while every pool process is busy. A message split over several batches
        (worker.batching) leaves a part at a time.
        """
        weight = self._weights.get(delivery_tag)
        if weight is None:
            return
        if jobs is None or jobs >= weight[0]:
            self._unweigh(delivery_tag)
            return
        self._weights[delivery_tag] = (weight[0] - jobs, weight[1])
        self._jobs -= jobs

    def _unweigh(self, delivery_tag: Any) -> None:
        jobs, size = self._weights.pop(delivery_tag, (0, 0))
        self._jobs -= jobs
        self._bytes -= size

    def ack(self, delivery_tag: Any) -> None:
        super().ack(delivery_tag)
        self._unweigh(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().reject(delivery_tag, requeue=requeue)
        self._unweigh(delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        super().restore_unacked(client)
        self._weights.clear()
        self._jobs = self._bytes = 0


class Channel(kombu_redis.Channel):
    """A Redis channel that drops unreadable or oversized messages and weighs what it takes."""

    QoS = WeighedQoS
    #: Set from Batchery's settings through the broker's transport options.
    max_message_bytes = 1 << 62
    prefetch_jobs = 1 << 62
    prefetch_bytes = 1 << 62
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "max_message_bytes",
        "prefetch_jobs",
        "prefetch_bytes",
    )
    _polls = 0

    def take_order(self) -> tuple[int, ...]:
        """The priority lists this poll reads, in order (see the module docstring)."""
        self._polls += 1
        return SHARE.get(self._polls % 8, TAKE_ORDER)

    def take_now(self, high_only: bool = False) -> bool:
        """Take the next message at once, by the same rule as a poll (see ``take_order``).

        Called as a batch finishes, before the freed pool process gets its next batch: a high
        job waiting in Redis while the worker is full of other work joins that batch rather
        than waiting for the next, and one grab in eight still looks at lower work first, as
        polls do. One script pops the first non-empty list in order (no blocking); the
        message is delivered as a BRPOP's is (recorded unacked). ``high_only``: look at the
        high list alone (for a worker whose prefetch is full, see worker.batching).
        """
        order = (HIGH,) if high_only else self.take_order()
        for queue in self.active_queues:
            keys = [self._q_for_pri(queue, pri) for pri in order]
            try:
                with self.conn_or_acquire() as client:
                    item = client.eval(_POP_FIRST, len(keys), *keys)
            except self.connection_errors:
                return False
            if item is not None:
                self._deliver_item(item, queue)
                return True
        return False

    def _deliver_item(self, item: bytes, queue: str) -> None:
        """Hand a popped message to kombu, or drop it (logged by its length, never its
        content) if it is over the byte limit or not a kombu envelope."""
        if len(item) > self.max_message_bytes:
            log.error("dropped a message of %d bytes, over the limit of %d "
                      "(BATCHERY_MAX_MESSAGE_BYTES)", len(item),
                      self.max_message_bytes)  # fmt: skip
            return
        try:
            self.connection._deliver(loads(bytes_to_str(item)), queue)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("dropped a message that is not a kombu envelope (%s, %d bytes)",
                      type(exc).__name__, len(item))  # fmt: skip

    def _brpop_start(self, timeout: Any = None) -> None:
        # kombu 5.7's own, reading the priority lists in take_order()'s order rather than
        # always highest first.
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.take_order() for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        command_args = ["BRPOP", *keys, timeout or 0]
        if self.global_keyprefix:
            command_args = self.client._prefix_args(command_args)
        self.client.connection.send_command(*command_args)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7's own, with the size check and the refusal of what isn't an envelope.
        # Everything past parsing (Celery's consumer) refuses bad messages itself (see
        # worker.refusals).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise kombu_redis.Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self._deliver_item(item, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel`'s checks and weighing, on a connection kombu finds through Sentinel."""

    from_transport_options = (  # type: ignore[assignment]
        *Channel.from_transport_options,
        *(option for option in kombu_redis.SentinelChannel.from_transport_options
          if option not in Channel.from_transport_options),
    )  # fmt: skip


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`SentinelChannel`."""

    Channel = SentinelChannel
