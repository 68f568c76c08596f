"""Batchery's producer side: submit images as jobs and read their results.

Never imports TensorFlow: a producer is small and starts fast.
"""

from producer.client import Client
from producer.errors import BatcheryError

__all__ = ["BatcheryError", "Client"]
