"""kombu's Redis transport, hardened: a message that is not a kombu envelope is dropped.

kombu pops a message off the queue and parses it before Celery sees it. Anything pushed
there that is not JSON, or JSON without an envelope's shape (``properties`` not an object,
a body that isn't base64), raises out of kombu's event loop and stops the worker; and a
restarted worker meets the next such message. Here such a message is logged (its length,
never its content) and dropped: it was already popped, so nothing else is lost.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class Channel(kombu_redis.Channel):
    """A Redis channel that drops unreadable messages instead of raising."""

    def _brpop_read(self, **options: Any) -> bool:
        # Everything past parsing (Celery's consumer) refuses bad messages itself (see
        # worker.refusals): what reaches here was raised by kombu reading the envelope.
        try:
            delivered: bool = super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.error("dropped a message that is not a kombu envelope (%s: %s)",
                      type(exc).__name__, str(exc)[:200])  # fmt: skip
            return True
        return delivered


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
