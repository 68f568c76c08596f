"""A long-running command stops on the first Ctrl-C, even one Python drops in a finalizer."""

from __future__ import annotations

import io
import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest

from batchery import status
from batchery.stopping import stop_on_signals
from producer.stopping import interrupts_noted


class InterruptedWhileCollected:
    """An object whose finalizer receives the Ctrl-C: Python prints the KeyboardInterrupt
    raised there as "Exception ignored" and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes, here
            pass


def reading(*_: Any) -> dict[str, Any]:
    InterruptedWhileCollected()  # collected at once: the interrupt lands in its __del__
    return {"done": 0, "failed": 0, "batches": 0}


def test_a_ctrl_c_dropped_in_a_finalizer_still_sets_the_flag() -> None:
    with stop_on_signals() as stop:
        reading()
        assert stop.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_ctrl_c_dropped_while_a_command_loads_stops_it_once_it_starts() -> None:
    """Noted from ``main``'s first line: the command's own stop starts out set."""
    with interrupts_noted() as noted:
        reading()  # the Ctrl-C lands in a finalizer before the command's handler is set
        assert noted.is_set()
        with stop_on_signals() as stop:
            assert stop.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    with stop_on_signals() as stop:
        assert not stop.is_set()  # the next command starts afresh


def test_a_worker_that_saw_a_ctrl_c_while_it_loaded_never_starts(monkeypatch) -> None:
    """TensorFlow takes seconds to import: a Ctrl-C Python drops there (in an import's
    clean-up) is noted, and the worker exits 130 instead of starting Celery."""
    from batchery import cli
    from worker import app

    started: list[bool] = []
    check = app.check_libraries

    def check_then_interrupted() -> None:
        check()
        reading()  # the Ctrl-C lands in a finalizer: Python drops the KeyboardInterrupt

    monkeypatch.setattr(app, "check_libraries", check_then_interrupted)
    monkeypatch.setattr(app, "_start", lambda *args: started.append(True))
    assert cli.main(["worker"]) == 130
    assert not started
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


@pytest.mark.timeout(10)
def test_status_watch_stops_on_a_ctrl_c_python_dropped(monkeypatch) -> None:
    monkeypatch.setattr(status, "collect", reading)
    monkeypatch.setattr(status, "render", lambda shown: "")
    client = SimpleNamespace(retrying=lambda call: call())
    out = io.StringIO()
    status.watch(client, 0.01, as_json=True, out=out)  # type: ignore[arg-type]
    assert out.getvalue() == ""  # stopped before a second reading was shown


def test_a_ctrl_c_while_the_command_imports_is_noted_and_exits_130() -> None:
    """Raised inside an import, a KeyboardInterrupt can come out as another error (a CI run:
    a TypeError out of ssl's import, exit 1) or be dropped: while batchery.cli's imports load
    it is only noted, and main exits 130 before doing anything."""
    import subprocess
    import sys

    code = (
        "import importlib.abc, os, signal, sys\n"
        "class Interrupting(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'producer.wire':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Interrupting())\n"
        "from batchery.cli import main\n"
        "sys.exit(main(['status']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
