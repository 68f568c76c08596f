"""Stopping a long-running command on the first Ctrl-C (or SIGTERM), wherever it lands.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be, and
an exception raised inside a finalizer (a socket's or a connection's ``__del__`` run by the
garbage collector) is printed as "Exception ignored" and dropped: the interrupt is lost,
and a loop goes on. So the handler also sets a flag that the command's loop checks: the
exception stops a blocking call at once, the flag stops the loop even if the exception
was swallowed.

A Ctrl-C can also land before a command's own handler is set, while it loads its modules,
and an import's clean-up callback drops it just the same. So the command notes interrupts
from its first line (:func:`interrupts_noted`), and a ``stop_on_signals`` entered later
starts out stopped when one came.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: The events of the :func:`interrupts_noted` blocks now open (innermost last).
_noted: list[threading.Event] = []


@contextmanager
def interrupts_noted() -> Iterator[threading.Event]:
    """An event set by any SIGINT from here to the block's end, as well as the usual
    ``KeyboardInterrupt``: set even when Python dropped the exception. A command checks it
    once loaded; :func:`stop_on_signals` inside the block starts stopped if it is set. The
    previous handler comes back on exit; outside the main thread nothing is noted."""
    # stop_on_signals' own SIGINT handler, whose event is also listed as noted: a
    # stop_on_signals inside sees it.
    with stop_on_signals(signal.SIGINT) as noted:
        _noted.append(noted)
        try:
            yield noted
        finally:
            _noted.remove(noted)


def interrupted_while_loading() -> bool:
    """Whether an enclosing :func:`interrupts_noted` has seen a Ctrl-C: for a command that
    loads for long (a worker imports TensorFlow) before it sets handlers of its own."""
    return any(noted.is_set() for noted in _noted)


@contextmanager
def stop_on_signals(*signums: int) -> Iterator[threading.Event]:
    """An event set by the first of ``signums`` (SIGINT and SIGTERM by default), which also
    raise ``KeyboardInterrupt``; the previous handlers come back on exit. Set from the start
    if an enclosing :func:`interrupts_noted` saw a Ctrl-C. Outside the main thread (where no
    handler can be set) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def interrupt(signum: int, frame: Any) -> None:
        stop.set()
        for noted in _noted:
            noted.set()
        raise KeyboardInterrupt

    if interrupted_while_loading():
        stop.set()  # a Ctrl-C came while the command was loading
    wanted = signums or (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, interrupt) for signum in wanted}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
