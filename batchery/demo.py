"""``batchery demo``: classify the example digits through Redis and real workers, end to end."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from batchery.local import RedisServer, WorkerProcess
from producer import connections
from producer.client import Client
from producer.errors import RedisUnavailableError
from producer.images import IMAGE_EXTENSIONS
from producer.settings import Settings, redact_url
from producer.stopping import stop_on_signals
from producer.wire import SUCCESS

DEFAULT_DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


def expected_label(path: Path) -> str:
    """The true label the example's file name carries: ``<label>_<n>.png``."""
    return path.stem.split("_", 1)[0]


def run_demo(
    settings: Settings, digits: Path, out: TextIO, start_worker: bool = True,
    timeout: float = 300.0, serve_port: int | None = None,
) -> float:  # fmt: skip
    """Classify every image in ``digits``; print each result and the accuracy; return it.

    Uses ``settings.redis_url`` if a Redis answers there, else starts a redis-server on a free
    port. Starts a worker unless ``start_worker`` is False (then the workers already serving
    that Redis answer). ``serve_port``: then serve the gateway (the web page and the API) on
    127.0.0.1 at that port, on the same Redis and worker, until interrupted. Stops whatever
    it started, on the first Ctrl-C (or SIGTERM) wherever it lands: interrupted before it
    serves, it raises ``KeyboardInterrupt``; while it serves, it returns.
    """
    files = sorted(p for p in Path(digits).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images in {digits}")
    with ExitStack() as stack:
        # The flag too: a Ctrl-C Python dropped in a finalizer still stops the waits below.
        stop = stack.enter_context(stop_on_signals())
        if connections.answers(settings):
            print(f"redis:  using {redact_url(settings.redis_url)}", file=out)
        elif not start_worker:
            raise RedisUnavailableError(f"no Redis answers at {redact_url(settings.redis_url)}")
        else:
            server = stack.enter_context(RedisServer())
            settings = replace(settings, redis_url=server.url)
            print(f"redis:  started redis-server at {server.url}", file=out)
        worker = None
        if start_worker:
            worker = stack.enter_context(WorkerProcess(settings.redis_url))
            print(
                f"worker: started (pid {worker.process.pid if worker.process else '?'}, "
                f"log {worker.log_path})",
                file=out,
            )
        client = stack.enter_context(Client(settings=settings))

        started = time.monotonic()
        # One job first: it answers once a worker has loaded its model.
        first = client.submit(files[0])
        deadline = started + timeout
        while client.results([first], timeout=1.0)[0]["status"] not in ("SUCCESS", "FAILURE"):
            if stop.is_set():
                raise KeyboardInterrupt
            if worker is not None:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker answered within {timeout:g} s")
        print(f"ready:  first answer after {time.monotonic() - started:.1f} s", file=out)

        started = time.monotonic()
        ids = client.submit_many(files)
        results = client.results(ids, timeout=timeout)
        if stop.is_set():
            raise KeyboardInterrupt
        elapsed = time.monotonic() - started
        accuracy = report(files, results, elapsed, out)
        if serve_port is not None:
            from gateway.app import serve

            print(f"\nthe web page: open http://127.0.0.1:{serve_port} (Ctrl-C stops it all)",
                  file=out, flush=True)  # fmt: skip
            serve(settings, "127.0.0.1", serve_port, log_level="warning", stop=stop)
    if serve_port is None:
        print("next: `make serve`, then open http://127.0.0.1:8000 to drop your own digits "
              "(or `batchery serve` beside your workers)", file=out)  # fmt: skip
    return accuracy


def report(files: list[Path], results: list[dict[str, Any]], elapsed: float, out: TextIO
           ) -> float:  # fmt: skip
    """Print each result against the label in its file name, and the accuracy; return it."""
    right = 0
    for path, result in zip(files, results, strict=True):
        truth = expected_label(path)
        ok = result["status"] == SUCCESS and result["label"] == truth
        right += ok
        if result["status"] == SUCCESS:
            detail = f"label {result['label']}  score {result['score']:.3f}"
        else:
            detail = f"{result['status']}: {result['error']}"
        print(
            f"{path.name:<14} true {truth}  {detail:<28} "
            f"batch {result.get('batch_size')}  {'ok' if ok else 'WRONG'}",
            file=out,
        )
    accuracy = right / len(files)
    print(f"classified {len(files)} images in {elapsed * 1000:.0f} ms through Redis", file=out)
    print(f"accuracy: {accuracy * 100:.1f}%", file=out, flush=True)
    return accuracy
