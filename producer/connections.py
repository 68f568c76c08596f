"""Every Redis client Batchery opens is built here: the URL, TLS, ACL, Sentinel, replica acks.

``BATCHERY_REDIS_URL`` names one Redis (``redis://``, ``rediss://``) or, in the form Celery's
own ``broker_url`` takes, the sentinels that watch a primary and its replicas::

    sentinel://[USER:PASSWORD@]h1:26379[/DB];sentinel://h2:26379;sentinel://h3:26379

with the primary's name in ``BATCHERY_SENTINEL_MASTER``. The user and password in the URL are
Redis's (the primary's and replicas'), as in Celery; the sentinels' own are
``BATCHERY_SENTINEL_USERNAME`` / ``_PASSWORD``. A client built from a Sentinel URL asks the
sentinels where the primary is on every new connection, and a connection to a primary that
was demoted is dropped, so a failover is a short run of connection errors that the callers'
retries ride out.

Replica acks (``BATCHERY_REPLICA_ACKS=N``): Redis replicates asynchronously, so a write the
primary acknowledged can die with it. A push, and a batch's result write, are followed on
the same connection by ``WAIT N``: they return only once N replicas hold them, or raise
:class:`~producer.errors.ReplicaAckError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from producer.errors import ConfigError, ReplicaAckError
from producer.settings import Settings, redact_url

SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed ``sentinel://`` URL: the sentinels, and the database and login of Redis."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        """Parse ``sentinel://h1:26379;sentinel://h2:26379/0``; the database and login may be
        written on any one part, or on all alike (a :class:`ConfigError` if parts disagree)."""
        sentinels: list[tuple[str, int]] = []
        found: dict[str, set[Any]] = {"db": set(), "username": set(), "password": set()}
        for part in url.split(";"):
            part = part.strip()
            if not part:
                continue
            try:
                split = urlsplit(part)
                port = split.port or SENTINEL_PORT
            except ValueError as exc:
                raise ConfigError(f"BATCHERY_REDIS_URL: {redact_url(part)!r}: {exc}") from exc
            if split.scheme != "sentinel" or not split.hostname:
                raise ConfigError(
                    f"BATCHERY_REDIS_URL: {redact_url(part)!r} is not sentinel://HOST[:PORT]; "
                    "separate sentinels with ';'"
                )
            sentinels.append((split.hostname, port))
            path = split.path.strip("/")
            if path:
                if not path.isdigit():
                    raise ConfigError(f"BATCHERY_REDIS_URL: database {path!r} is not a number")
                found["db"].add(int(path))
            if split.username:
                found["username"].add(unquote(split.username))
            if split.password is not None:
                found["password"].add(unquote(split.password))
        if not sentinels:
            raise ConfigError("BATCHERY_REDIS_URL names no sentinel")
        for name, values in found.items():
            if len(values) > 1:
                raise ConfigError(f"BATCHERY_REDIS_URL: its parts name different {name}s")
        first = {name: next(iter(values), None) for name, values in found.items()}
        return cls(tuple(sentinels), first["db"] or 0, first["username"], first["password"])

    def celery_url(self) -> str:
        """The URL for Celery and kombu, which read the database and login from the first
        part only: written on every part, so every reader agrees."""
        login = ""
        if self.username or self.password:
            login = f"{_quote(self.username or '')}:{_quote(self.password or '')}@"
        return ";".join(f"sentinel://{login}{host}:{port}/{self.db}"
                        for host, port in self.sentinels)  # fmt: skip


def _quote(text: str) -> str:
    return quote(text, safe="")


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the sentinels themselves: their login, and TLS like Redis's."""
    return _login(settings, settings.sentinel_username, settings.sentinel_password)


def _master_options(settings: Settings, address: SentinelAddress) -> dict[str, Any]:
    return {"db": address.db, **_login(settings, address.username, address.password)}


def _login(settings: Settings, username: str | None, password: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if settings.redis_tls:
        options.update(settings.redis_ssl(), ssl=True)
    return options


def _with_room_to_wait(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    # redis-py gives up reading a reply after 5 s by default: a WAIT may take its whole
    # timeout, and must not be cut short as if Redis had gone.
    if settings.replica_acks and "socket_timeout" not in options:
        options = {**options, "socket_timeout": max(5.0, settings.replica_ack_timeout_s + 2.0)}
    return options


def client(settings: Settings, **options: Any) -> redis.Redis:
    """A Redis client for ``settings`` (``options``: redis-py's, e.g. ``max_connections``,
    timeouts, ``retry``), following the primary when the URL names sentinels."""
    return cast(redis.Redis, _build(settings, options, redis.Redis, Sentinel))


def async_client(settings: Settings, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``settings``, as :func:`client`."""
    return cast(aioredis.Redis, _build(settings, options, aioredis.Redis, AsyncSentinel))


def _build(settings: Settings, options: dict[str, Any], redis_class: Any,
           sentinel_class: Any) -> Any:  # fmt: skip
    # redis-py's sync and asyncio clients take the same arguments: one recipe for both.
    options = _with_room_to_wait(settings, options)
    if not settings.sentinel:
        return redis_class.from_url(settings.redis_url, **options, **settings.redis_ssl())
    address = SentinelAddress.parse(settings.redis_url)
    connect = {k: v for k, v in options.items() if k.startswith("socket_connect")}
    sentinel = sentinel_class(list(address.sentinels), sentinel_kwargs={**connect,
                              **sentinel_kwargs(settings)})  # fmt: skip
    return sentinel.master_for(
        str(settings.sentinel_master), redis_class=redis_class,
        **_master_options(settings, address), **options,
    )  # fmt: skip


def answers(settings: Settings, timeout: float = 1.0) -> bool:
    """True if the Redis ``settings`` name (through its sentinels, if so) answers PING."""
    return pings(client(settings, socket_connect_timeout=timeout, socket_timeout=timeout))


def pings(probe: redis.Redis) -> bool:
    """True if ``probe`` gets an answer to PING; it is closed either way."""
    try:
        return bool(probe.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return False
    finally:
        probe.close()


def celery_url(settings: Settings) -> str:
    """The broker and result backend URL for Celery (a Sentinel URL written out in full)."""
    if settings.sentinel:
        return SentinelAddress.parse(settings.redis_url).celery_url()
    return settings.redis_url


def sentinel_transport_options(settings: Settings) -> dict[str, Any]:
    """What Celery's broker and result backend need besides the URL to use the sentinels
    (their ``*_transport_options``); empty for one Redis."""
    if not settings.sentinel:
        return {}
    return {"master_name": settings.sentinel_master,
            "sentinel_kwargs": sentinel_kwargs(settings)}  # fmt: skip


@dataclass(frozen=True)
class ReplicaAcks:
    """``WAIT`` after a write: how many replicas must hold it, and for how long to wait."""

    replicas: int
    timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaAcks:
        """BATCHERY_REPLICA_ACKS and BATCHERY_REPLICA_ACK_TIMEOUT."""
        return cls(settings.replica_acks, settings.replica_ack_timeout_s)

    def add(self, pipe: Any) -> None:
        """Queue the ``WAIT`` last on a pipeline that holds the writes (nothing if off)."""
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, max(1, round(self.timeout_s * 1000)))

    def check(self, replies: list[Any], what: str) -> None:
        """Raise :class:`ReplicaAckError` unless the pipeline's ``WAIT`` (its last reply)
        counted enough replicas."""
        if not self.replicas:
            return
        held = int(replies[-1])
        if held < self.replicas:
            raise ReplicaAckError(
                f"{what}: {held} of the {self.replicas} replicas BATCHERY_REPLICA_ACKS asks "
                f"for confirmed it within {self.timeout_s:g} s (BATCHERY_REPLICA_ACK_TIMEOUT); "
                "it is on the primary, but a failover now could lose it"
            )
