"""Who may use the gateway: API keys from a file, and a rate limit per key shared in Redis.

BATCHERY_API_KEYS names a file of ``name:sha256hex`` lines, the SHA-256 of each key in hex
(``#`` starts a comment). The file never holds a key itself: ``batchery serve --hash-key``
prints a new key and its line. Each request's ``Authorization: Bearer KEY`` is hashed and
looked up; the key's name is recorded with its jobs and labels its metrics.

The rate limit is a GCRA (a token bucket without a refill timer) kept in Redis, so every
gateway behind a load balancer shares each key's budget: BATCHERY_API_RATE units a second,
bursts of BATCHERY_API_BURST. A request costs 1, and a submission one per image.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from producer.errors import ConfigError
from producer.wire import NAME_PATTERN, rate_key

_LINE = re.compile(r"(?P<name>[^:\s]+):(?P<digest>[0-9a-fA-F]{64})")


def digest(key: str) -> str:
    """The hex SHA-256 of an API key: what the keys file holds."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str) -> tuple[str, str]:
    """A fresh random key for ``name`` and the line to add to the keys file."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' or '-'")
    key = "bk_" + secrets.token_urlsafe(32)
    return key, f"{name}:{digest(key)}"


@dataclass(frozen=True)
class ApiKeys:
    """The keys file's names, by the digest of their key."""

    names: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        """Read a keys file; :class:`ConfigError` naming the line that is not ``name:sha256``."""
        names: dict[str, str] = {}
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = _LINE.fullmatch(line)
            if match is None or not NAME_PATTERN.fullmatch(match["name"]):
                raise ConfigError(
                    f"{path}:{number}: expected name:sha256hex (a name of letters, digits, "
                    "'.', '_', '-' and the key's SHA-256 in hex; see batchery serve --hash-key)"
                )
            names[match["digest"].lower()] = match["name"]
        if not names:
            raise ConfigError(f"{path}: no keys (BATCHERY_API_KEYS)")
        return cls(names)

    def name_of(self, authorization: str | None) -> str | None:
        """The key's name for an ``Authorization: Bearer KEY`` header; None if it is no key."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self.names.get(digest(key.strip()))


# GCRA. KEYS[1]: the key's theoretical arrival time (ms). ARGV: ms per unit, burst in ms,
# cost. Time is Redis's own, so gateways with skewed clocks agree. Returns 0 (allowed, and
# charged) or the ms to wait before this cost would be.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local after = tat + per * cost
local wait = after - burst - now
if wait > 0 then return math.ceil(wait) end
redis.call('SET', KEYS[1], after, 'PX', math.ceil(after - now) + 1000)
return 0
"""


class RateLimiter:
    """Each key's rate, shared by every gateway through Redis."""

    def __init__(self, client: aioredis.Redis, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._script = client.register_script(_GCRA)

    async def wait_s(self, owner: str, cost: int = 1) -> float:
        """0.0 if ``owner`` may spend ``cost`` now (and it is spent), else the seconds to
        wait; ``inf`` if ``cost`` is more than a whole burst."""
        if cost > self.burst:
            return float("inf")
        per_ms = 1000.0 / self.rate
        args = [per_ms, per_ms * self.burst, cost]
        waited = await self._script(keys=[rate_key(owner)], args=args)
        return int(waited) / 1000.0
