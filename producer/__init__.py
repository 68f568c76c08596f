"""Batchery's producer side: submit images as jobs and read their results.

Never imports TensorFlow: a producer is small and starts fast. ``Client`` is imported on
first use, so that the shared core (``producer.wire``, ``producer.stopping``, ...) imports
without Redis' client or Pillow: the command sets its Ctrl-C handler before those load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.errors import BatcheryError

if TYPE_CHECKING:
    from producer.client import Client

__all__ = ["BatcheryError", "Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from producer.client import Client

        return Client
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
