"""The library versions whose insides Batchery relies on, checked when a worker starts.

Batchery overrides private parts of kombu's Redis transport (``worker.transport``), of
celery-batches (``worker.batching``) and of Celery's prefork pool (``worker.prefork``), and
sets kombu options that older releases ignore without a word (``unacked_restore_interval``:
without it a lost worker's messages come back after ~100 s instead of ~1 s). A worker on
other versions refuses to start and says which it needs, rather than running on assumptions
that no longer hold.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from producer.errors import ConfigError

#: (distribution, lowest version, first version not supported), and why.
REQUIRED = (
    ("kombu", (5, 7), (5, 8), "worker.transport overrides kombu 5.7's Redis channel and QoS"),
    ("celery-batches", (0, 11), (0, 12), "worker.batching overrides celery-batches 0.11"),
)


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_libraries() -> None:
    """Raise :class:`ConfigError` naming what is needed, unless every library fits."""
    for dist, low, high, why in REQUIRED:
        found = version(dist)
        if not low <= _release(found) < high:
            raise ConfigError(
                f"{dist} {found} is installed, but Batchery needs {dist}>="
                f"{'.'.join(map(str, low))},<{'.'.join(map(str, high))} ({why}): "
                "pip install -e '.[worker]'"
            )
    from celery_batches import Batches, SimpleRequest, trace
    from kombu.transport import redis as kombu_redis

    _require(kombu_redis.Channel, "kombu.transport.redis.Channel",
             "_brpop_read", "_brpop_start", "_flush_brpop_reauth", "_queue_cycle",
             "_q_for_pri", "brpop_timeout", "global_keyprefix", "sep", "QoS")  # fmt: skip
    _require(kombu_redis.SentinelChannel, "kombu.transport.redis.SentinelChannel",
             "_sentinel_managed_pool", "from_transport_options")  # fmt: skip
    _require(kombu_redis.QoS, "kombu.transport.redis.QoS",
             "append", "ack", "reject", "restore_unacked", "can_consume")  # fmt: skip
    for option in ("unacked_restore_interval", "unacked_restore_throttle"):
        if option not in kombu_redis.Channel.from_transport_options:
            raise ConfigError(f"kombu's Redis transport has no {option!r} option: need kombu 5.7")
    _require(Batches, "celery_batches.Batches",
             "Strategy", "flush", "_do_flush", "_buffer", "_tref", "_pool")  # fmt: skip
    _require(SimpleRequest, "celery_batches.SimpleRequest", "from_request")
    _require(trace, "celery_batches.trace", "apply_batches_task")
    from celery.concurrency import asynpool

    # worker.prefork: its flush at a warm shutdown.
    _require(asynpool.AsynPool, "celery.concurrency.asynpool.AsynPool",
             "flush", "_flush_writer", "outbound_buffer", "synack", "_active_writers")  # fmt: skip


def _require(owner: Any, name: str, *attributes: str) -> None:
    # Instance attributes count when the class's __init__ sets them.
    found = set(dir(owner))
    code = getattr(getattr(owner, "__init__", None), "__code__", None)
    if code is not None:
        found |= set(code.co_names)
    missing = [a for a in attributes if a not in found]
    if missing:
        raise ConfigError(
            f"{name} has no {', '.join(missing)}: Batchery needs the versions in pyproject.toml"
        )
