"""Webhooks: a job's result POSTed to its ``callback_url`` once answered, signed, at least once.

The path of one delivery:

1. ``Client.submit_many(..., callback_url=URL)`` writes the URL into the job's record
   (``wire.job_key``) in the script that pushes the job.
2. The script that stores the job's answer (a worker's, or a cancellation's) finds the URL
   and adds ``job``, ``url`` to the stream ``wire.WEBHOOK_STREAM`` in the same script: no
   answer is stored without its delivery.
3. Every gateway runs a :class:`Deliverer`, one consumer of the group ``wire.WEBHOOK_GROUP``:
   it reads new entries, POSTs the result (the same dict ``GET /v1/jobs/{id}`` returns) with
   an HMAC-SHA256 signature, and acknowledges the entry on a 2xx answer.
4. An entry not acknowledged (the receiver failed, timed out or refused the connection, or
   the gateway was killed mid-delivery) stays pending in the group, in Redis. It is claimed
   again after a backoff that doubles from 1 s to 5 min, by its own gateway or, once it has
   been idle longer than an attempt can take, by any other: a restarted gateway picks up
   its predecessor's. It is given up BATCHERY_WEBHOOK_RETRY_S after the job was answered.

So a receiver may see a delivery twice (the ``X-Batchery-Delivery`` header tells them
apart); it never misses one while a gateway with the secret runs within the retry time.

Who may be called: :class:`WebhookPolicy`. Only ``http``/``https`` URLs whose host
BATCHERY_WEBHOOK_ALLOW names, and only at public addresses unless the list names the address
or its network too: loopback, private and link-local addresses are refused unless listed by
address, so a name that resolves to an internal service does not reach it. The delivery
connects to the address it checked (no second lookup a DNS rebinding could change).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis

from producer.errors import InvalidJobError, WebhookRefusedError, WireError
from producer.settings import Settings
from producer.wire import (
    STATS_KEY,
    WEBHOOK_FAILED_KEY,
    WEBHOOK_GROUP,
    WEBHOOK_STREAM,
    bounded,
    check_callback_url,
    decode_result_meta,
    excerpt,
    result_key,
)

log = logging.getLogger("batchery.webhooks")

SIGNATURE_HEADER = "X-Batchery-Signature"
#: How old a signature a receiver should accept, by default (replayed deliveries are older).
TOLERANCE_S = 300
#: The longest pause between two attempts at one delivery.
MAX_BACKOFF_S = 300.0
#: Deliveries given up on that are kept for inspection (``batchery status``).
FAILED_KEPT = 1000

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Batchery-Signature`` value: ``t=<unix time>,v1=<hex HMAC-SHA256>`` over
    ``"<unix time>." + body`` (the time is signed too, so an old delivery can't be replayed
    as new)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, body: bytes, header: str, tolerance_s: float = TOLERANCE_S,
    now: float | None = None,
) -> bool:  # fmt: skip
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s``.

    What a receiver written in Python calls on each delivery (the README shows the same
    check in a few lines of any language).
    """
    fields = dict(part.partition("=")[::2] for part in header.split(","))
    try:
        timestamp = int(fields.get("t", ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).partition(",v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


@dataclass(frozen=True)
class WebhookPolicy:
    """Which callback URLs this deployment calls: BATCHERY_WEBHOOK_ALLOW's entries.

    An entry is a host name (``hooks.example.com``), every subdomain of one
    (``*.example.com``), any host name (``*``), or an address or network (``127.0.0.1``,
    ``10.0.0.0/8``). A URL's host must match a name entry, or be an address inside a listed
    network; and every address the name resolves to must be public or inside a listed
    network. Empty: webhooks are off.
    """

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    any_name: bool = False
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> WebhookPolicy:
        """The policy of these entries; :class:`WebhookRefusedError` for one that is none."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[Network] = []
        any_name = False
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry == "*":
                any_name = True
            elif entry.startswith("*.") and _is_name(entry[2:]):
                suffixes.append(entry[1:])
            elif _is_name(entry):
                names.add(entry)
            else:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError as exc:
                    raise WebhookRefusedError(
                        f"BATCHERY_WEBHOOK_ALLOW entry {excerpt(raw)} is not a host name, "
                        "*.domain, *, an address or a network"
                    ) from exc
        return cls(frozenset(names), tuple(suffixes), any_name, tuple(networks))

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        """The policy BATCHERY_WEBHOOK_ALLOW sets."""
        return cls.parse(settings.webhook_allow)

    @property
    def enabled(self) -> bool:
        """Whether any URL at all may be called."""
        return bool(self.names or self.suffixes or self.any_name or self.networks)

    def check_url(self, url: str) -> tuple[str, int]:
        """The URL's host and port if its form and host are allowed (no DNS lookup yet);
        :class:`WebhookRefusedError` saying why not."""
        try:
            check_callback_url(url)
        except InvalidJobError as exc:
            raise WebhookRefusedError(str(exc)) from exc
        if not self.enabled:
            raise WebhookRefusedError(
                "webhooks are off: BATCHERY_WEBHOOK_ALLOW names no host a callback may reach"
            )
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _address(host)
        if address is not None:
            if self.address_allowed(address):
                return host, port
        elif host in self.names or self.any_name or host.endswith(self.suffixes):
            return host, port
        raise WebhookRefusedError(f"callback host {excerpt(host)} is not in BATCHERY_WEBHOOK_ALLOW")

    def address_allowed(self, address: Address) -> bool:
        """A listed network holds it, or it is public and some name may be called."""
        if any(address in network for network in self.networks):
            return True
        public = address.is_global and not address.is_multicast
        return public and (self.any_name or bool(self.names or self.suffixes))

    async def resolve(self, url: str) -> tuple[str, int, str]:
        """Host, port and the one address to connect to, each checked; refuses a name
        resolving to any address not allowed (a public name pointing inside is refused)."""
        host, port = self.check_url(url)
        literal = _address(host)
        if literal is not None:
            return host, port, str(literal)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionError(f"cannot resolve {host}: {exc}") from exc
        addresses = [_address(str(info[4][0])) for info in infos]
        refused = [str(a) for a in addresses if a is None or not self.address_allowed(a)]
        if refused or not addresses:
            raise WebhookRefusedError(
                f"callback host {host} resolves to {', '.join(refused) or 'nothing'}, which "
                "BATCHERY_WEBHOOK_ALLOW does not list (internal addresses must be listed)"
            )
        return host, port, str(addresses[0])


def _is_name(text: str) -> bool:
    labels = text.split(".")
    return (
        bool(text)
        and _address(text) is None
        and "/" not in text
        and all(label and len(label) < 64 and label.replace("-", "").isalnum() for label in labels)
        and not labels[-1].isdigit()
    )


def backoff(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: 1, 2, 4, ... at most 5 min."""
    return min(2.0 ** max(0, attempts - 1), MAX_BACKOFF_S)


class Deliverer:
    """One gateway's webhook delivery: a consumer of the deliveries' group (see the module).

    ``on_outcome(outcome)`` is called with ``delivered``, ``retry`` or ``given_up`` after
    each attempt (the gateway counts them in its metrics).
    """

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        concurrency: int = 32,
    ) -> None:
        if not settings.webhook_secret:
            raise WebhookRefusedError("webhook delivery needs BATCHERY_WEBHOOK_SECRET")
        self.settings = settings
        self.secret = settings.webhook_secret
        self.redis = client
        self.policy = WebhookPolicy.from_settings(settings)
        self.on_outcome = on_outcome
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = asyncio.Semaphore(concurrency)
        self._mine: set[str] = set()  # entries this process is delivering right now
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; Redis outages are waited out."""
        import httpx

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        async with httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False,
            trust_env=False, limits=limits,
        ) as http:  # fmt: skip
            self._http = http
            reclaim = asyncio.create_task(self._reclaim_forever(stop))
            try:
                while not stop.is_set():
                    try:
                        await self._read_new()
                    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                        log.warning("webhooks: Redis unreachable (%s); retrying in 1 s", exc)
                        await asyncio.sleep(1.0)
            finally:
                reclaim.cancel()
                for task in list(self._tasks):
                    task.cancel()
                await asyncio.gather(reclaim, *self._tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(WEBHOOK_STREAM, WEBHOOK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read_new(self) -> None:
        await self._ensure_group()
        while True:
            await self._slots.acquire()  # read no more than can be delivered at once
            self._slots.release()
            reply: Any = await self.redis.xreadgroup(
                WEBHOOK_GROUP, self.name, {WEBHOOK_STREAM: ">"}, count=32, block=1000
            )
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(entry_id, fields, 1)
            if not reply:
                return  # back to the loop: the stop flag is checked once a second

    def _start(self, entry_id: Any, fields: dict[Any, Any] | None, attempt: int) -> None:
        key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        if key in self._mine:
            return
        self._mine.add(key)
        task = asyncio.create_task(self._deliver(key, fields or {}, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reclaim_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._reclaim()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                pass  # the reader logs it
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
            await asyncio.sleep(0.5)

    async def _reclaim(self) -> None:
        """Claim pending entries whose backoff has passed: this process's failed attempts,
        and any consumer's entries idle longer than an attempt can take (it died)."""
        stalled = self.settings.webhook_timeout_s + 2.0
        pending: Any = await self.redis.xpending_range(
            WEBHOOK_STREAM, WEBHOOK_GROUP, min="-", max="+", count=256, idle=1000
        )
        for entry in pending:
            entry_id = entry["message_id"]
            key = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if key in self._mine:
                continue
            owner = entry["consumer"]
            owner = owner.decode() if isinstance(owner, bytes) else str(owner)
            wait = backoff(int(entry["times_delivered"]))
            if owner != self.name:
                wait = max(wait, stalled)
            if entry["time_since_delivered"] < wait * 1000:
                continue
            claimed: Any = await self.redis.xclaim(
                WEBHOOK_STREAM, WEBHOOK_GROUP, self.name, int(wait * 1000), [entry_id]
            )
            for claimed_id, fields in claimed:
                self._start(claimed_id, fields, int(entry["times_delivered"]) + 1)

    async def _deliver(self, entry_id: str, fields: dict[Any, Any], attempt: int) -> None:
        async with self._slots:
            try:
                outcome = await self._attempt(entry_id, fields, attempt)
            except (redis.ConnectionError, redis.TimeoutError):
                outcome = "retry"  # left pending: claimed again once Redis is back
            finally:
                self._mine.discard(entry_id)
        self.on_outcome(outcome)

    async def _attempt(self, entry_id: str, fields: dict[Any, Any], attempt: int) -> str:
        job = _text(fields.get(b"job", fields.get("job")))
        url = _text(fields.get(b"url", fields.get("url")))
        answered_at = int(entry_id.split("-", 1)[0]) / 1000
        if time.time() - answered_at > self.settings.webhook_retry_s:
            await self._give_up(entry_id, job, url, "retried for BATCHERY_WEBHOOK_RETRY_S")
            return "given_up"
        raw = await self.redis.get(result_key(job)) if job else None
        try:
            body = json.dumps(decode_result_meta(raw)).encode() if raw is not None else None
        except WireError:
            body = None
        if body is None:
            await self._give_up(entry_id, job, url, "the job's result is gone (expired)")
            return "given_up"
        try:
            host, port, address = await self.policy.resolve(url)
        except WebhookRefusedError as exc:
            await self._give_up(entry_id, job, url, str(exc))
            return "given_up"
        except ConnectionError as exc:
            log.info("webhook for job %s: %s (attempt %d)", job, exc, attempt)
            return "retry"
        error = await self._post(url, host, port, address, body, job, entry_id, attempt)
        if error is not None:
            log.info("webhook for job %s to %s failed (attempt %d): %s; next in %g s",
                     job, excerpt(url, 80), attempt, error, backoff(attempt))  # fmt: skip
            return "retry"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(WEBHOOK_STREAM, WEBHOOK_GROUP, entry_id)
            pipe.xdel(WEBHOOK_STREAM, entry_id)
            pipe.hincrby(STATS_KEY, "webhooks_delivered", 1)
            await pipe.execute()
        return "delivered"

    async def _post(
        self, url: str, host: str, port: int, address: str, body: bytes, job: str,
        entry_id: str, attempt: int,
    ) -> str | None:  # fmt: skip
        """POST to the checked address; None on a 2xx answer, else what went wrong."""
        import httpx

        timestamp = int(time.time())
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Batchery-Webhook/1",
            "Host": host if port == default_port else f"{host}:{port}",
            "X-Batchery-Job": job,
            "X-Batchery-Delivery": entry_id,
            "X-Batchery-Attempt": str(attempt),
            "X-Batchery-Timestamp": str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
        }
        target = httpx.URL(url).copy_with(host=address, port=port)
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        try:
            response = await self._http.post(target, content=body, headers=headers,
                                             extensions=extensions)  # fmt: skip
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _give_up(self, entry_id: str, job: str, url: str, reason: str) -> None:
        log.warning("webhook for job %s to %s given up: %s", job, excerpt(url, 80), reason)
        record = json.dumps({"job_id": job, "url": url, "reason": bounded(reason),
                             "at": time.time()})  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(WEBHOOK_STREAM, WEBHOOK_GROUP, entry_id)
            pipe.xdel(WEBHOOK_STREAM, entry_id)
            pipe.lpush(WEBHOOK_FAILED_KEY, record)
            pipe.ltrim(WEBHOOK_FAILED_KEY, 0, FAILED_KEPT - 1)
            pipe.hincrby(STATS_KEY, "webhooks_failed", 1)
            await pipe.execute()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
