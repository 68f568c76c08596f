"""Signed task messages: Celery's auth serializer, for messages Batchery builds by hand.

With BATCHERY_SIGNING_* set, every task message a producer (or a worker isolating a job)
sends is signed with its private key, and workers accept only messages signed by a
certificate in their store: someone who can write to Redis but holds no key can't make a
worker run anything. Celery's own code signs and verifies (``celery.security``); this
module only feeds it the bodies Batchery builds. Needs ``pip install 'batchery[signing]'``.
"""

from __future__ import annotations

from typing import Any

from producer.errors import ConfigError
from producer.settings import Settings

#: The content type kombu registers for Celery's auth serializer.
CONTENT_TYPE = "application/data"


class Signer:
    """Signs message bodies with a private key and its certificate."""

    content_type = CONTENT_TYPE

    def __init__(self, key_pem: str, cert_pem: str) -> None:
        try:
            from celery.security.certificate import Certificate
            from celery.security.key import PrivateKey
            from celery.security.serialization import SecureSerializer
        except ImportError as exc:  # celery.security needs cryptography
            raise ConfigError(
                "message signing needs the cryptography package: pip install 'batchery[signing]'"
            ) from exc
        try:
            self._serializer = SecureSerializer(
                PrivateKey(key_pem), Certificate(cert_pem), digest="sha256", serializer="json"
            )
        except Exception as exc:  # celery.security raises SecurityError for bad PEM
            raise ConfigError(f"signing key or certificate not usable: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings) -> Signer | None:
        """The signer ``settings`` ask for, or None when messages are not signed."""
        if not settings.signing:
            return None
        assert settings.signing_key is not None and settings.signing_cert is not None
        return cls(settings.signing_key.read_text(), settings.signing_cert.read_text())

    def sign(self, payload: Any) -> bytes:
        """The signed body for a task message's ``payload`` (args, kwargs, embed)."""
        signed: str | bytes = self._serializer.serialize(payload)  # base64 text
        return signed.encode("ascii") if isinstance(signed, str) else signed
