"""Signed task messages (Celery's auth serializer, for messages Batchery builds by hand),
and signed registry manifests.

With BATCHERY_SIGNING_* set, every task message a producer (or a worker isolating a job)
sends is signed with its private key, and workers accept only messages signed by a
certificate in their store: someone who can write to Redis but holds no key can't make a
worker run anything. Celery's own code signs and verifies (``celery.security``); this
module only feeds it the bodies Batchery builds. Needs ``pip install 'batchery[signing]'``.

The same key signs what ``models publish`` and ``promote`` write (``model.json``,
``PROMOTED``), and workers with signing set up load only manifests whose signature verifies:
editing ``model.json`` by hand (to set ``trusted``, say) no longer makes a worker run anything.
"""

from __future__ import annotations

import json
from base64 import b64decode, b64encode
from typing import Any

from producer.errors import ConfigError, ModelLoadError
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


class ManifestKey:
    """Signs registry manifests (``model.json``, ``PROMOTED``) with the message signing key.

    A signature covers what the file says and where it belongs (``context``: the model and
    version), so a manifest can't be edited, nor moved to another model, without breaking it.
    """

    def __init__(self, key_pem: str, cert_pem: str) -> None:
        from celery.security.certificate import Certificate
        from celery.security.key import PrivateKey
        from celery.security.utils import get_digest_algorithm

        try:
            self._key = PrivateKey(key_pem)
            self._cert_id = Certificate(cert_pem).get_id()
        except Exception as exc:  # celery.security raises SecurityError for bad PEM
            raise ConfigError(f"signing key or certificate not usable: {exc}") from exc
        self._digest = get_digest_algorithm("sha256")

    @classmethod
    def from_settings(cls, settings: Settings) -> ManifestKey | None:
        """The key ``settings`` ask for, or None when nothing is signed."""
        if not settings.signing:
            return None
        assert settings.signing_key is not None and settings.signing_cert is not None
        return cls(settings.signing_key.read_text(), settings.signing_cert.read_text())

    def sign(self, context: str, data: bytes) -> str:
        """A one-line JSON signature of ``data`` in ``context``."""
        signature = self._key.sign(_signed_bytes(context, data), self._digest)
        return json.dumps(
            {"signer": self._cert_id, "sha256-rsa-pss": b64encode(signature).decode()}
        )


class ManifestVerifier:
    """Checks registry manifests against the certificates in BATCHERY_SIGNING_CERTS."""

    def __init__(self, certs_dir: str) -> None:
        from celery.security.certificate import FSCertStore
        from celery.security.utils import get_digest_algorithm

        try:
            self._store = FSCertStore(certs_dir)
        except Exception as exc:
            raise ConfigError(f"BATCHERY_SIGNING_CERTS={certs_dir!r}: {exc}") from exc
        self._digest = get_digest_algorithm("sha256")

    @classmethod
    def from_settings(cls, settings: Settings) -> ManifestVerifier | None:
        """The verifier ``settings`` ask for, or None when manifests are not checked."""
        if not settings.signing:
            return None
        return cls(str(settings.signing_certs))

    def verify(self, context: str, data: bytes, signature: str | None, what: str) -> None:
        """Raise :class:`ModelLoadError` unless ``signature`` signs ``data`` in ``context``."""
        if not signature:
            raise ModelLoadError(f"{what} is not signed: a worker that checks signatures "
                                 "serves only what `batchery models publish` signed")  # fmt: skip
        try:
            signed = json.loads(signature)
            cert = self._store[signed["signer"]]
            cert.verify(_signed_bytes(context, data), b64decode(signed["sha256-rsa-pss"]),
                        self._digest)  # fmt: skip
        except Exception as exc:
            raise ModelLoadError(
                f"{what}: its signature does not verify against BATCHERY_SIGNING_CERTS "
                f"({type(exc).__name__}); it was changed after it was signed, or signed by a "
                "key the workers don't trust"
            ) from exc


def _signed_bytes(context: str, data: bytes) -> bytes:
    return b"batchery-manifest\0" + context.encode() + b"\0" + data
