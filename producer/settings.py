"""Batchery's settings: one frozen dataclass, read from the environment in one place."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.errors import ConfigError
from producer.wire import MAX_JOBS_PER_MESSAGE, base64_limit

#: The repository's own models/ folder: the registry used when BATCHERY_MODEL_DIR is unset.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Settings:
    """Everything Batchery can be configured with. Build it with :meth:`from_env`."""

    redis_url: str = "redis://localhost:6379/0"
    sentinel_master: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool = False
    replica_acks: int = 0
    replica_ack_timeout_s: float = 5.0
    queue: str = "batchery"
    model_dir: Path = field(default=DEFAULT_MODEL_DIR)
    default_model: str = "mnist-cnn"
    model_path: Path | None = None
    max_loaded_models: int = 4
    model_watch_s: float = 1.0
    result_ttl_s: int = 24 * 3600
    batch_size: int = 64
    batch_wait_ms: float = 5.0
    batch_budget_ms: float = 25.0
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    chunk_size: int = 256
    top_k: int = 3
    visibility_timeout_s: int = 60
    poison_kills: int = 3
    max_queue: int = 0
    queue_wait_s: float = 30.0
    connect_retry_s: float = 10.0
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    redis_tls_ca: Path | None = None
    redis_tls_cert: Path | None = None
    redis_tls_key: Path | None = None
    signing_key: Path | None = None
    signing_cert: Path | None = None
    signing_certs: Path | None = None
    metrics_port: int | None = None
    task_events: bool = True
    log_format: str = "text"
    max_message_bytes: int = 8 * 1024 * 1024
    prefetch_jobs: int = 0
    prefetch_bytes: int = 64 * 1024 * 1024
    batch_time_limit_s: float = 120.0
    default_deadline_s: float | None = None
    api_keys: Path | None = None
    api_rate: float = 20.0
    api_burst: int = 200
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_allow: tuple[str, ...] = ()
    webhook_retry_s: float = 3600.0
    webhook_timeout_s: float = 10.0
    http_max_body: int = 64 * 1024 * 1024
    http_max_wait_s: float = 60.0
    http_body_timeout_s: float = 30.0
    shared_roots: tuple[Path, ...] = ()
    monitor: bool = True
    worker_kind: str = "auto"
    monitor_window_jobs: int = 1000
    drift_threshold: float = 0.2
    low_confidence: float = 0.5

    def __post_init__(self) -> None:
        if self.chunk_size > MAX_JOBS_PER_MESSAGE:
            raise ConfigError(
                f"BATCHERY_CHUNK_SIZE={self.chunk_size}: a message carries at most "
                f"{MAX_JOBS_PER_MESSAGE} jobs"
            )
        if self.worker_kind not in ("auto", "full", "lite"):
            raise ConfigError(
                f"BATCHERY_WORKER_KIND={self.worker_kind!r}: use auto, full (TensorFlow: every "
                "format) or lite (LiteRT versions only, no TensorFlow)"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"BATCHERY_LOG_FORMAT={self.log_format!r}: use text or json")
        tls = (self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)
        if any(tls) and not self.redis_tls:
            raise ConfigError(
                "BATCHERY_REDIS_TLS_* are set but BATCHERY_REDIS_URL is not rediss:// (nor a "
                "sentinel:// URL with BATCHERY_SENTINEL_TLS=1)"
            )
        if self.sentinel and not self.sentinel_master:
            raise ConfigError(
                "BATCHERY_REDIS_URL is a sentinel:// URL: set BATCHERY_SENTINEL_MASTER to the "
                "name the sentinels monitor the primary by"
            )
        if self.sentinel_tls and not self.sentinel:
            raise ConfigError("BATCHERY_SENTINEL_TLS=1 needs a sentinel:// BATCHERY_REDIS_URL")
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ConfigError("BATCHERY_REDIS_TLS_CERT and BATCHERY_REDIS_TLS_KEY go together")
        if self.webhook_secret is not None and len(self.webhook_secret) < 16:
            raise ConfigError("BATCHERY_WEBHOOK_SECRET must be at least 16 characters")
        signing = (self.signing_key, self.signing_cert, self.signing_certs)
        if any(signing) and not all(signing):
            raise ConfigError(
                "message signing needs BATCHERY_SIGNING_KEY, BATCHERY_SIGNING_CERT and "
                "BATCHERY_SIGNING_CERTS together"
            )

    @property
    def message_limit(self) -> int:
        """The largest message a worker takes: a full message, or one job of the largest image."""
        return max(self.max_message_bytes, base64_limit(self.max_image_bytes) + 64 * 1024)

    @property
    def prefetch_job_limit(self) -> int:
        """Jobs a worker holds before they run (BATCHERY_PREFETCH_JOBS; by default two
        batches per pool process, or a chunk per pool process and one more)."""
        return self.prefetch_jobs or max(
            2 * self.batch_size * self.concurrency, (self.concurrency + 1) * self.chunk_size
        )

    @property
    def sentinel(self) -> bool:
        """Whether BATCHERY_REDIS_URL names Redis Sentinels rather than one Redis."""
        return self.redis_url.startswith("sentinel://")

    @property
    def redis_tls(self) -> bool:
        """Whether Redis (and, with Sentinel, the sentinels) is reached over TLS."""
        return self.redis_url.startswith("rediss://") or (self.sentinel and self.sentinel_tls)

    @property
    def signing(self) -> bool:
        """Whether task messages are signed and only signed ones accepted."""
        return self.signing_key is not None

    def redis_ssl(self) -> dict[str, Any]:
        """TLS options for a ``rediss://`` URL, or Sentinel with BATCHERY_SENTINEL_TLS=1
        (redis-py, kombu and Celery take the same keys).

        The server's certificate is always verified: against BATCHERY_REDIS_TLS_CA, or the
        system's CAs without it. Empty for a plain ``redis://`` URL.
        """
        if not self.redis_tls:
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for key, path in (("ssl_ca_certs", self.redis_tls_ca),
                          ("ssl_certfile", self.redis_tls_cert),
                          ("ssl_keyfile", self.redis_tls_key)):  # fmt: skip
            if path is not None:
                options[key] = str(path)
        return options

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``BATCHERY_*`` variables; anything unset keeps its default."""
        env = os.environ if env is None else env
        defaults = cls()

        def text(name: str, default: str) -> str:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default: float, kind: type = int, minimum: float = 1) -> float:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from exc
            if value < minimum:
                raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
            return value

        def flag(name: str, default: bool = False) -> bool:
            raw = env.get(name, "").strip().lower()
            if raw not in ("", "0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"{name}={raw!r}: use 1 or 0")
            return default if not raw else raw in ("1", "true", "yes")

        def path(name: str) -> Path | None:
            value = env.get(name, "").strip()
            if not value:
                return None
            if not Path(value).exists():
                raise ConfigError(f"{name}={value!r}: no such file or directory")
            return Path(value)

        return cls(
            redis_url=text("BATCHERY_REDIS_URL", defaults.redis_url),
            sentinel_master=env.get("BATCHERY_SENTINEL_MASTER", "").strip() or None,
            sentinel_username=env.get("BATCHERY_SENTINEL_USERNAME", "").strip() or None,
            sentinel_password=env.get("BATCHERY_SENTINEL_PASSWORD", "") or None,
            sentinel_tls=flag("BATCHERY_SENTINEL_TLS"),
            replica_acks=int(number("BATCHERY_REPLICA_ACKS", defaults.replica_acks, minimum=0)),
            replica_ack_timeout_s=float(
                number("BATCHERY_REPLICA_ACK_TIMEOUT", defaults.replica_ack_timeout_s, float, 0.001)
            ),
            queue=text("BATCHERY_QUEUE", defaults.queue),
            model_dir=Path(text("BATCHERY_MODEL_DIR", str(defaults.model_dir))),
            default_model=text("BATCHERY_DEFAULT_MODEL", defaults.default_model),
            model_path=Path(env["BATCHERY_MODEL_PATH"]) if env.get("BATCHERY_MODEL_PATH") else None,
            max_loaded_models=int(number("BATCHERY_MAX_LOADED_MODELS", defaults.max_loaded_models)),
            model_watch_s=float(
                number("BATCHERY_MODEL_WATCH_S", defaults.model_watch_s, float, minimum=0.1)
            ),
            result_ttl_s=int(number("BATCHERY_RESULT_TTL", defaults.result_ttl_s)),
            batch_size=int(number("BATCHERY_BATCH_SIZE", defaults.batch_size)),
            batch_wait_ms=float(
                number("BATCHERY_BATCH_WAIT_MS", defaults.batch_wait_ms, float, minimum=0)
            ),
            batch_budget_ms=float(
                number("BATCHERY_BATCH_BUDGET_MS", defaults.batch_budget_ms, float, minimum=0)
            ),
            concurrency=int(number("BATCHERY_CONCURRENCY", defaults.concurrency)),
            chunk_size=int(number("BATCHERY_CHUNK_SIZE", defaults.chunk_size)),
            top_k=int(number("BATCHERY_TOP_K", defaults.top_k)),
            visibility_timeout_s=int(
                number("BATCHERY_VISIBILITY_TIMEOUT", defaults.visibility_timeout_s)
            ),
            poison_kills=int(number("BATCHERY_POISON_KILLS", defaults.poison_kills)),
            max_queue=int(number("BATCHERY_MAX_QUEUE", defaults.max_queue, minimum=0)),
            queue_wait_s=float(
                number("BATCHERY_QUEUE_WAIT", defaults.queue_wait_s, float, minimum=0)
            ),
            connect_retry_s=float(
                number("BATCHERY_CONNECT_RETRY", defaults.connect_retry_s, float, minimum=0)
            ),
            max_image_bytes=int(number("BATCHERY_MAX_IMAGE_BYTES", defaults.max_image_bytes)),
            max_image_pixels=int(number("BATCHERY_MAX_IMAGE_PIXELS", defaults.max_image_pixels)),
            redis_tls_ca=path("BATCHERY_REDIS_TLS_CA"),
            redis_tls_cert=path("BATCHERY_REDIS_TLS_CERT"),
            redis_tls_key=path("BATCHERY_REDIS_TLS_KEY"),
            signing_key=path("BATCHERY_SIGNING_KEY"),
            signing_cert=path("BATCHERY_SIGNING_CERT"),
            signing_certs=path("BATCHERY_SIGNING_CERTS"),
            metrics_port=(
                int(number("BATCHERY_METRICS_PORT", 0, minimum=1))
                if env.get("BATCHERY_METRICS_PORT", "").strip()
                else None
            ),
            task_events=flag("BATCHERY_TASK_EVENTS", default=True),
            log_format=text("BATCHERY_LOG_FORMAT", defaults.log_format).lower(),
            max_message_bytes=int(
                number("BATCHERY_MAX_MESSAGE_BYTES", defaults.max_message_bytes, minimum=1024)
            ),
            prefetch_jobs=int(number("BATCHERY_PREFETCH_JOBS", defaults.prefetch_jobs, minimum=0)),
            prefetch_bytes=int(
                number("BATCHERY_PREFETCH_BYTES", defaults.prefetch_bytes, minimum=1024)
            ),
            batch_time_limit_s=float(
                number("BATCHERY_BATCH_TIME_LIMIT", defaults.batch_time_limit_s, float)
            ),
            default_deadline_s=(
                float(number("BATCHERY_DEFAULT_DEADLINE_S", 0.0, float, minimum=0.001))
                if env.get("BATCHERY_DEFAULT_DEADLINE_S", "").strip()
                else None
            ),
            api_keys=path("BATCHERY_API_KEYS"),
            api_rate=float(number("BATCHERY_API_RATE", defaults.api_rate, float, minimum=0.001)),
            api_burst=int(number("BATCHERY_API_BURST", defaults.api_burst)),
            webhook_secret=env.get("BATCHERY_WEBHOOK_SECRET", "").strip() or None,
            webhook_allow=tuple(
                entry.strip()
                for entry in env.get("BATCHERY_WEBHOOK_ALLOW", "").split(",")
                if entry.strip()
            ),
            webhook_retry_s=float(
                number("BATCHERY_WEBHOOK_RETRY_S", defaults.webhook_retry_s, float)
            ),
            webhook_timeout_s=float(
                number("BATCHERY_WEBHOOK_TIMEOUT_S", defaults.webhook_timeout_s, float, 0.1)
            ),
            http_max_body=int(
                number("BATCHERY_HTTP_MAX_BODY", defaults.http_max_body, minimum=1024)
            ),
            http_max_wait_s=float(
                number("BATCHERY_HTTP_MAX_WAIT", defaults.http_max_wait_s, float, minimum=0)
            ),
            http_body_timeout_s=float(
                number("BATCHERY_HTTP_BODY_TIMEOUT", defaults.http_body_timeout_s, float, 0.1)
            ),
            shared_roots=shared_roots(env.get("BATCHERY_SHARED_ROOTS", "")),
            monitor=flag("BATCHERY_MONITOR", default=True),
            worker_kind=text("BATCHERY_WORKER_KIND", defaults.worker_kind).lower(),
            monitor_window_jobs=int(
                number("BATCHERY_MONITOR_WINDOW_JOBS", defaults.monitor_window_jobs, minimum=50)
            ),
            drift_threshold=float(
                number("BATCHERY_DRIFT_THRESHOLD", defaults.drift_threshold, float, 0.001)
            ),
            low_confidence=float(
                number("BATCHERY_LOW_CONFIDENCE", defaults.low_confidence, float, minimum=0)
            ),
        )


def shared_roots(value: str) -> tuple[Path, ...]:
    """BATCHERY_SHARED_ROOTS: the ``:``-separated directories a worker reads ``path`` jobs
    under; each must be an absolute path to an existing directory."""
    roots = []
    for part in value.split(":"):
        if not part.strip():
            continue
        root = Path(part.strip())
        if not root.is_absolute() or not root.is_dir():
            raise ConfigError(f"BATCHERY_SHARED_ROOTS: {part!r} is not an absolute path to a "
                              "directory")  # fmt: skip
        roots.append(root)
    return tuple(roots)


#: A query parameter that carries a secret (``?password=``, ``sentinel_password=``, ...).
_SECRET_QUERY = re.compile(r"([?&;][A-Za-z_]*(?:password|passwd|pass|secret|token)=)[^&;#]*", re.I)
#: ``scheme://userinfo@host[:port][/path][?query]``: the userinfo is everything up to the
#: last ``@`` that a host follows, so a password holding ``/``, ``#`` or ``@`` is still in it.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@"
    r"(?P<host>(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)(?::\d+)?(?:[/?#].*)?)",
    re.S,
)


#: Where a Sentinel URL's next part starts: a ``;`` followed by a scheme.
_NEXT_URL = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def redact_url(url: str) -> str:
    """The URL with every password replaced by ``***``, fit for logs and error messages.

    Hides the userinfo's password (``:pw@``, ``user:pw@``, even one holding ``/``, ``#`` or
    ``@``) and secret query parameters (``?password=``), in each of a Sentinel URL's
    ``;``-separated parts. A user name is kept: it is not a secret.
    """
    return ";".join(_redact_one(part) for part in _NEXT_URL.split(url))


def _redact_one(url: str) -> str:
    url = _SECRET_QUERY.sub(r"\1***", url)
    match = _USERINFO.fullmatch(url)
    if match is None:
        return url
    user, colon, _ = match["userinfo"].partition(":")
    userinfo = f"{user}:***" if colon else match["userinfo"]
    return f"{match['scheme']}{userinfo}@{match['host']}"
