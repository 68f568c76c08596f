"""Stopping a long-running command on the first Ctrl-C (or SIGTERM), wherever it lands.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be, and
an exception raised inside a finalizer (a socket's or a connection's ``__del__`` run by the
garbage collector) is printed as "Exception ignored" and dropped: the interrupt is lost,
and a loop goes on. So the handler also sets a flag that the command's loop checks: the
exception stops a blocking call at once, the flag stops the loop even if the exception
was swallowed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def stop_on_signals(*signums: int) -> Iterator[threading.Event]:
    """An event set by the first of ``signums`` (SIGINT and SIGTERM by default), which also
    raise ``KeyboardInterrupt``; the previous handlers come back on exit. Outside the main
    thread (where no handler can be set) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def interrupt(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    wanted = signums or (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, interrupt) for signum in wanted}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
