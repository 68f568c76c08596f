"""Webhooks: a job's result POSTed to its ``callback_url`` once answered, signed, at least once.

What a producer and a receiver need lives here: :func:`sign`, :func:`verify` (a receiver's
check) and :class:`WebhookPolicy` (the callback allow-list ``Client.submit`` applies). The
delivery itself is the gateway's: ``gateway.delivery``.

The path of one delivery:

1. ``Client.submit_many(..., callback_url=URL)`` writes the URL into the job's record
   (``wire.job_key``) in the script that pushes the job.
2. The script that stores the job's answer (a worker's, or a cancellation's) finds the URL
   and adds ``job``, ``url`` to the stream ``wire.WEBHOOK_STREAM`` in the same script: no
   answer is stored without its delivery.
3. Every gateway runs a ``gateway.delivery.Deliverer``, one consumer of the group
   ``wire.WEBHOOK_GROUP``: it reads new entries, POSTs the result (the same dict ``GET
   /v1/jobs/{id}`` returns) with an HMAC-SHA256 signature, and acknowledges the entry on a
   2xx answer.
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
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from producer.errors import InvalidJobError, WebhookRefusedError
from producer.settings import Settings
from producer.wire import (
    check_callback_url,
    excerpt,
)

log = logging.getLogger("batchery.webhooks")

SIGNATURE_HEADER = "X-Batchery-Signature"
#: How old a signature a receiver should accept, by default (replayed deliveries are older).
TOLERANCE_S = 300

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
