"""Stopping on the first Ctrl-C: :func:`producer.stopping.stop_on_signals`, which lives in
``producer/`` so that ``batchery classify``'s loop (``producer.bulk``) uses it too."""

from producer.stopping import stop_on_signals

__all__ = ["stop_on_signals"]
