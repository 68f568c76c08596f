"""Every long-running command stops on the first Ctrl-C, wherever it lands.

Each command runs as a child in its own session, and the Ctrl-C goes to its whole process
group, as a terminal sends it: at several moments, from Python's start-up (imports), through
connecting, to mid-run. A Ctrl-C that Python drops (raised in a finalizer, see
``producer.stopping``) can't be timed from outside: the commands' loops are given one here,
in process. ``status --watch`` has its own in ``test_operations.py``.

What each command promises (docs/operations.md, "Stopping"): ``classify`` cancels its jobs in
flight, leaves whole rows, exits 130; ``serve`` and ``demo --serve`` shut down and exit 0 once
serving (130 if the demo was still classifying); ``worker`` makes Celery's warm shutdown (the
batch in hand, then exit 0). Before a command's handler is set, Python's own: 130 from
``main``, or killed by SIGINT during the first imports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchery.local import RedisServer, WorkerProcess, free_port
from producer import bulk
from producer.client import Client
from producer.settings import Settings
from tests.factories import digit_paths, wait_for, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Exit statuses of a Ctrl-C that came before the command set its own handler: ``main``'s
#: 130, or (during the first imports, before ``main``) killed by SIGINT.
EARLY = (130, -signal.SIGINT)


def start(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``batchery ARGS`` in its own session (its own process group, as a terminal's job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchery.cli", *args],
        env={**os.environ, "BATCHERY_REDIS_URL": url, **(env or {})}, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def ctrl_c(proc: subprocess.Popen[str], within: float, what: str) -> tuple[str, str]:
    """Ctrl-C to the process group; its output once it exited, failing if not ``within`` s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{what}: still running {within:g} s after a Ctrl-C\n{out[-2000:]}"
                    f"\n{err[-2000:]}")  # fmt: skip


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def serving(port: int) -> Any:
    return lambda: answers(f"http://127.0.0.1:{port}/healthz")


class InterruptedWhileCollected:
    """A Ctrl-C that lands in a finalizer: Python prints "Exception ignored" and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes, here
            pass


# --- classify -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """15,000 digits in 150 folders (about 2 s of classify here, so a Ctrl-C 1 s in lands
    mid-run); their paths in the order classify takes them."""
    root = tmp_path_factory.mktemp("ctrl-c") / "in"
    for i in range(150):
        shutil.copytree(ROOT / "examples" / "digits", root / f"set{i:03d}")
    return list(bulk.iter_inputs([str(root)]))


def check_rows(out: Path, err: str, paths: list[str]) -> int:
    """A stopped run's output is whole: each row a whole line, in input order, as many as
    the summary says; return how many."""
    text = out.read_text() if out.exists() else ""
    assert text == "" or text.endswith("\n"), "the last row was cut short"
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["path"] for r in rows] == paths[: len(rows)]
    assert all(r["status"] == "SUCCESS" for r in rows)
    if "interrupted: " in err:  # stopped in the loop (else before it: no rows)
        assert f"classified {len(rows)}:" in err
        cancelled = int(err.split("interrupted: ")[1].split()[0])
        assert cancelled <= len(paths) - len(rows)
    elif f"classified {len(paths)}:" in err:
        assert len(rows) == len(paths)  # done, and the Ctrl-C came as it exited
    else:
        assert not rows
    return len(rows)


def test_classify_stops_on_the_first_ctrl_c_wherever_it_lands(
    redis_server: RedisServer, worker: WorkerProcess, folder: list[str], tmp_path: Path
) -> None:
    """Ctrl-C while Python starts, while it connects and counts, mid-run (rows written)."""
    root = str(Path(folder[0]).parents[1])
    written = []
    for delay in (0.05, 0.2, 0.3, 0.4, 0.6, 1.0, None):
        out = tmp_path / f"out-{delay}.jsonl"
        run = start(redis_server.url, "classify", root, "-o", str(out))
        if delay is None:  # mid-run: once it has written rows
            wait_for(lambda o=out: o.exists() and o.stat().st_size > 2000, run, 60, "rows")
        else:
            time.sleep(delay)
        assert run.poll() is None, "classify finished before its Ctrl-C"
        _, err = ctrl_c(run, 5, f"classify, Ctrl-C {delay} s after its start")
        assert run.returncode in EARLY, (delay, run.returncode, err[-2000:])
        written.append(check_rows(out, err, folder))
    assert written[-1] > 0
    # What was cancelled is picked up again: every path once.
    resumed = start(redis_server.url, "classify", root, "-o", str(out), "--resume")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == sorted(
        folder
    )


@pytest.mark.timeout(20)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop
def test_classify_stops_on_a_ctrl_c_python_dropped(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker serves its queue, so only the Ctrl-C ends the run: the one Python drops."""
    settings = Settings(redis_url=redis_server.url, queue=f"unserved-{uuid.uuid4().hex[:8]}")
    paths = [str(p) for p in digit_paths(300)]
    looks = 0
    with Client(settings=settings) as client:
        fetch = client.fetch

        def fetch_then_interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
            nonlocal looks
            looks += 1
            if looks == 5:
                InterruptedWhileCollected()  # collected at once: the Ctrl-C lands in __del__
            return fetch(*args, **kwargs)

        monkeypatch.setattr(client, "fetch", fetch_then_interrupted)
        summary = bulk.classify(client, paths, tmp_path / "out.jsonl", progress=None)
        assert summary.interrupted and summary.total == 0
        assert summary.cancelled == len(paths)  # every job it pushed: none left to compute
    assert looks < 50, "it went on looking for answers after the Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


# --- serve ----------------------------------------------------------------------------------


def test_serve_stops_on_the_first_ctrl_c_wherever_it_lands(redis_server: RedisServer) -> None:
    for delay in (0.05, 0.15, 0.25, 0.35, 0.5, None):
        port = free_port()
        serve = start(redis_server.url, "serve", "--port", str(port))
        if delay is None:  # serving, with a request waiting on a job no one answers
            wait_for(serving(port), serve, 30, "/healthz")
            url = f"http://127.0.0.1:{port}/v1/jobs/nobody?wait=30"
            threading.Thread(target=answers, args=(url,), daemon=True).start()
            time.sleep(0.2)
        else:
            time.sleep(delay)
        # A request in flight: uvicorn's graceful shutdown gives it 5 s.
        _, err = ctrl_c(serve, 4 if delay is not None else 10, f"serve, Ctrl-C at {delay}")
        assert serve.returncode in (0, *EARLY), (delay, serve.returncode, err[-2000:])
        if delay is None:
            assert serve.returncode == 0, err[-2000:]


@pytest.mark.timeout(60)
def test_serve_stops_on_a_ctrl_c_python_dropped(redis_server: RedisServer) -> None:
    """The flag set and no exception (what a dropped Ctrl-C leaves): the gateway stops."""
    from gateway.app import serve

    port, stop, done = free_port(), threading.Event(), threading.Event()
    late: list[bool] = []

    def dropped_once_serving() -> None:
        deadline = time.monotonic() + 10
        while not answers(f"http://127.0.0.1:{port}/healthz") and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        if not done.wait(5):  # still serving: a real Ctrl-C (uvicorn's), so the test ends
            late.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=dropped_once_serving, daemon=True).start()
    serve(Settings(redis_url=redis_server.url), port=port, log_level="warning", stop=stop)
    done.set()
    assert stop.is_set() and not late, "the gateway went on serving after a dropped Ctrl-C"
    assert not answers(f"http://127.0.0.1:{port}/healthz")


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop
def test_serve_stops_on_a_ctrl_c_python_dropped_while_it_loads(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands in an import's clean-up callback before the command has set its
    handler (a CI run's ``serve`` at 0.15 s went on serving): ``main`` notes it from its first
    line, and the command exits 130 without serving."""
    from batchery import cli

    port, done, served = free_port(), threading.Event(), []
    parser = cli._parser

    def parser_then_interrupted() -> Any:
        InterruptedWhileCollected()  # collected at once: the Ctrl-C lands in its __del__
        return parser()

    def stopped_if_serving() -> None:
        deadline = time.monotonic() + 20
        while not done.is_set() and time.monotonic() < deadline:
            if answers(f"http://127.0.0.1:{port}/healthz"):
                served.append(True)
                os.kill(os.getpid(), signal.SIGINT)  # a real one, so the test ends
                return
            time.sleep(0.05)

    monkeypatch.setattr(cli, "_parser", parser_then_interrupted)
    monkeypatch.setenv("BATCHERY_REDIS_URL", redis_server.url)
    threading.Thread(target=stopped_if_serving, daemon=True).start()
    try:
        status = cli.main(["serve", "--port", str(port), "--loglevel", "warning"])
    finally:
        done.set()
    assert not served, "it went on to serve after a Ctrl-C dropped while it loaded"
    assert status == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


# --- demo --serve ---------------------------------------------------------------------------


def test_demo_serve_stops_on_the_first_ctrl_c_wherever_it_lands(
    redis_server: RedisServer, worker: WorkerProcess
) -> None:
    """On the suite's worker (``--no-worker``): while it starts, classifies, serves."""
    for delay in (0.1, 0.4, 0.7, None):
        port = free_port()
        demo = start(redis_server.url, "demo", "--no-worker", "--serve", str(port))
        if delay is None:
            wait_for(serving(port), demo, 60, "serving")
        else:
            time.sleep(delay)
        out, err = ctrl_c(demo, 5, f"demo --serve, Ctrl-C at {delay}")
        if delay is None:
            assert demo.returncode == 0, (out[-2000:], err[-2000:])
        else:  # 0 if the gateway had begun
            assert demo.returncode in (0, *EARLY), (delay, demo.returncode, err[-2000:])


def test_demo_serve_stops_what_it_started_on_the_first_ctrl_c() -> None:
    """Its own redis-server and worker: the terminal's Ctrl-C reaches the demo, which stops
    the worker (a warm shutdown) and then Redis, all within the bound."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    port = free_port()
    demo = start(nowhere, "demo", "--serve", str(port))
    wait_for(serving(port), demo, 120, "serving")
    out, err = ctrl_c(demo, 15, "demo --serve with its own worker")
    assert demo.returncode == 0, (out[-2000:], err[-2000:])
    pid = int(re.search(r"worker: started \(pid (\d+)", out).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped, and reaped
    redis_port = int(re.search(r"redis-server at redis://127.0.0.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _listening(redis_port)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- worker ---------------------------------------------------------------------------------


@pytest.fixture
def own_worker_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def test_worker_stops_on_the_first_ctrl_c_wherever_it_lands(own_worker_url: str) -> None:
    """While Python imports, while the pool loads the model, busy with a batch: Celery's
    warm shutdown, within the bound (the batch in hand, then the pool's exit)."""
    bound = 15.0
    for delay in (0.1, 0.5, 2.0):  # importing; Celery up, its pool loading the model
        early = start(own_worker_url, "worker", "--concurrency", "1")
        time.sleep(delay)
        _, err = ctrl_c(early, bound, f"worker, Ctrl-C {delay} s after its start")
        print(f"worker, Ctrl-C at {delay} s: exit {early.returncode}")
        assert early.returncode in (0, *EARLY), (delay, early.returncode, err[-2000:])

    busy = WorkerProcess(own_worker_url, "--concurrency", "2")
    with busy, Client(own_worker_url) as client:
        wait_until_serving(client, busy)
        client.submit_many(digit_paths() * 100)  # 10,000 jobs: batches in hand
        time.sleep(0.3)
        assert busy.process is not None
        started = time.monotonic()
        os.killpg(busy.process.pid, signal.SIGINT)
        try:
            busy.process.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running {bound:g} s after a Ctrl-C, busy")
        print(f"\nbusy worker stopped {time.monotonic() - started:.1f} s after Ctrl-C")
        assert busy.process.returncode == 0, busy.log_path.read_text()[-2000:]
        assert "Warm shutdown" in busy.log_path.read_text()
