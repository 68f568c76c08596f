"""A warm shutdown waits for every batch sent to a pool process, and strands none.

Celery's pool, driven here by its own event loop as a worker drives it, stopped where a
shutdown stops it: a task half written to its process (larger than a pipe holds), or
written whole but not yet acknowledged. Then what a warm shutdown does: close the pool,
flush it (the consumer's close), join it. Celery's own flush strands the process (for ever,
or 30 s); ``worker.prefork``'s lets it finish and answer.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery.concurrency import asynpool
from kombu.asynchronous import Hub

from worker.prefork import AsynPool, TaskPool

#: What a shutdown may take here: the process's task, then its exit (Celery's strands it).
JOIN_BOUND_S = 5.0


def started_pool(cls: type[Any]) -> tuple[Any, Iterator[Any]]:
    """A one-process pool on its own event loop, as a worker runs it, once the process is up."""
    hub = Hub()
    pool = cls(processes=1, synack=False, threads=False)
    pool.register_with_event_loop(hub)
    loop = hub.create_loop()
    deadline = time.monotonic() + 30
    while not pool.did_start_ok():
        assert time.monotonic() < deadline, "the pool process never came up"
        next(loop)
    return pool, loop


def sent(pool: Any, loop: Iterator[Any], payload: bytes, whole: bool) -> tuple[Any, list[Any]]:
    """Run the loop until ``len(payload)``'s task is half written (or written whole, not yet
    acknowledged): where a Ctrl-C can stop it."""
    answers: list[Any] = []
    job = pool.apply_async(len, (payload,), callback=answers.append)
    for _ in range(10_000):
        next(loop)
        ref = getattr(job, "_writer", None)
        writer = ref() if ref is not None else None
        begun = getattr(job, "_write_to", None) is not None
        if whole and begun and (writer is None or inspect.getgeneratorstate(writer) ==
                                "GEN_CLOSED"):  # fmt: skip
            break
        if not whole and begun and writer is not None and inspect.getgeneratorstate(
            writer) == "GEN_SUSPENDED":  # fmt: skip
            break
    else:
        pytest.fail("the task was never caught mid-way")
    assert not job._accepted
    return job, answers


def shut_down(pool: Any, bound_s: float = JOIN_BOUND_S) -> bool:
    """A warm shutdown's close, flush and join; whether the join ended within the bound."""
    pool.close()
    pool.flush()
    joined = threading.Thread(target=pool.join, daemon=True)
    joined.start()
    joined.join(bound_s)
    if joined.is_alive():
        pool.terminate()
        return False
    return True


@pytest.mark.parametrize(
    ("payload", "whole"),
    [(b"x" * 4_000_000, False), (b"x" * 100, True)],
    ids=["half-written", "written-not-acknowledged"],
)
def test_a_warm_shutdown_lets_the_process_finish_what_it_was_sent(
    payload: bytes, whole: bool
) -> None:
    pool, loop = started_pool(AsynPool)
    _, answers = sent(pool, loop, payload, whole)
    assert shut_down(pool), "the pool's processes did not stop within the bound"
    assert answers == [len(payload)]  # run, and its answer read


@pytest.mark.parametrize("whole", [False, True], ids=["half-written", "written-not-acknowledged"])
def test_celerys_own_flush_strands_the_process(whole: bool) -> None:
    """Why worker.prefork exists: if Celery fixes this, this test fails and the override can
    go (with the Celery version that fixed it pinned)."""
    pool, loop = started_pool(asynpool.AsynPool)
    sent(pool, loop, b"x" * (4_000_000 if not whole else 100), whole)
    assert not shut_down(pool, bound_s=3.0)  # stranded for ever, or for 30 s


def test_the_worker_runs_this_pool() -> None:
    from types import SimpleNamespace

    import click
    from celery.bin.worker import WorkersPool

    from producer.settings import Settings
    from worker.app import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    # What Celery's command line makes of the --pool=prefork that worker.app passes it.
    ctx = click.Context(click.Command("worker"), obj=SimpleNamespace(app=app))
    assert WorkersPool().convert("prefork", None, ctx) is TaskPool
    assert TaskPool.Pool is AsynPool
