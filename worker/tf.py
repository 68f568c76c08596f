"""TensorFlow, imported once per process, quietly, with the process's share of the cores.

Its own module so that ``worker.models`` and ``worker.explain`` both import it and neither
imports the other back.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

_tf_lock = threading.Lock()
_tf_configured = False


def tensorflow(threads: int | None = None) -> Any:
    """Import TensorFlow once per process, quietly, with ``threads`` intra-op threads."""
    global _tf_configured
    with _tf_lock:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if not _tf_configured:
            if threads:
                # Several worker processes share the cores: each keeps to its share.
                try:
                    tf.config.threading.set_intra_op_parallelism_threads(threads)
                    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
                except RuntimeError:
                    log.warning("TensorFlow already started: keeping its thread settings")
            _tf_configured = True
        return tf
