"""What ``batchery classify`` costs its own process, per small file, at the margin.

``python -m bench.producer_cpu --files 20000`` writes 28x28 PNG files (copies of
examples/digits), starts a throwaway redis-server, and runs the real ``batchery classify``
CLI as a child process over N files and over 2N files, while a stand-in worker in this
process answers every job: it pops each message, stores a SUCCESS result for each of its jobs
a batch of 64 at a time, at a worker core's pace (4,000 jobs/s; ``--rate 0``: at once), and
strikes the message off the ledger, as a worker would, without a model. The child's CPU time
(user and system, read by ``wait4`` when it exits) is the producer's own, start-up included;
the start-up cancels out at the margin::

    µs per file = (CPU over 2N files - CPU over N files) / N

Each size runs ``--runs`` times (3), interleaved, and the least CPU of each is kept: the
machine may be shared, and other work only ever adds to a process's CPU time. Every run must
write a SUCCESS row for every file, or the bench stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from batchery.local import RedisServer
from producer.ledger import settle
from producer.wire import PRIORITIES, JobResult, encode_result_meta, queue_key, result_key

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"
QUEUE = "bench-producer-cpu"


@dataclass(frozen=True)
class Cpu:
    """CPU seconds a run took, user and system."""

    user: float
    system: float

    @property
    def total(self) -> float:
        """User plus system."""
        return self.user + self.system

    def line(self) -> str:
        """``1.23 s (1.00 user + 0.23 system)``."""
        return f"{self.total:.2f} s ({self.user:.2f} user + {self.system:.2f} system)"


@dataclass(frozen=True)
class Margin:
    """The measurements over N and 2N files, and the cost of a file at the margin."""

    files: int
    small: Cpu
    large: Cpu

    @property
    def per_file_s(self) -> float:
        """(CPU over 2N files - CPU over N files) / N."""
        return (self.large.total - self.small.total) / self.files

    def line(self) -> str:
        """The result, for the terminal."""
        return (
            f"producer CPU at the margin: {self.per_file_s * 1e6:.1f} µs per file\n"
            f"  {self.files} files: {self.small.line()}\n"
            f"  {2 * self.files} files: {self.large.line()}"
        )


def margin(run: Callable[[int], Cpu], files: int, runs: int = 3) -> Margin:
    """``run(n)`` over ``files`` and ``2 * files`` files, ``runs`` times each, interleaved;
    the least CPU of each size, and from them the cost of a file at the margin."""
    small: list[Cpu] = []
    large: list[Cpu] = []
    for _ in range(runs):
        small.append(run(files))
        large.append(run(2 * files))
    return Margin(files, min(small, key=lambda c: c.total), min(large, key=lambda c: c.total))


def make_files(folder: Path, count: int) -> Path:
    """``count`` 28x28 PNG files in ``folder`` (copies of examples/digits, 1000 a subfolder)."""
    sources = [p.read_bytes() for p in sorted(DIGITS.glob("*.png"))]
    for i in range(count):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:07d}.png").write_bytes(sources[i % len(sources)])
    return folder


class StandIn:
    """Answers every job on ``queue``, in a thread of this process (not the producer's): a
    SUCCESS result per job, ``batch`` jobs at a time at ``rate`` jobs/s (0: at once), then
    the message struck off the ledger."""

    def __init__(self, url: str, queue: str, rate: float = 4000.0, batch: int = 64) -> None:
        self.redis = redis.Redis.from_url(url)
        self.queue = queue
        self.rate = rate
        self.batch = batch
        self.lists = [queue_key(queue, p) for p in PRIORITIES]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        answered, since = 0, time.monotonic()
        while not self._stop.is_set():
            popped = self.redis.brpop(self.lists, timeout=0.2)
            if popped is None:  # idle: the pace starts again with the next message
                answered, since = 0, time.monotonic()
                continue
            envelope = json.loads(popped[1])
            _, kwargs, _ = json.loads(envelope["body"])
            jobs = kwargs["jobs"]
            for start in range(0, len(jobs), self.batch):
                batch = jobs[start : start + self.batch]
                if self.rate:  # answered once a worker would have computed them
                    answered += len(batch)
                    time.sleep(max(0.0, since + answered / self.rate - time.monotonic()))
                with self.redis.pipeline(transaction=False) as pipe:
                    for job in batch:
                        result = JobResult(job["id"], "SUCCESS", label="7", class_index=7,
                                           score=0.99)  # fmt: skip
                        pipe.set(result_key(job["id"]), encode_result_meta(result), ex=3600)
                    if start + self.batch >= len(jobs):
                        settle(pipe, self.queue, [envelope["headers"]["id"]])
                    pipe.execute()


def classify_cpu(url: str, folder: Path, files: int, args: Sequence[str] = ()) -> Cpu:
    """Run ``batchery classify`` over ``folder`` (``files`` files) in a child process; its
    CPU time. Raises unless it wrote a SUCCESS row for every file."""
    out = folder.with_suffix(".jsonl")
    env = {**os.environ, "BATCHERY_REDIS_URL": url, "BATCHERY_QUEUE": QUEUE}
    child = subprocess.Popen(
        [sys.executable, "-m", "batchery.cli", "classify", str(folder), "-o", str(out), *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    with out.open() as fh:
        rows = sum(json.loads(line)["status"] == "SUCCESS" for line in fh)
    if child.returncode != 0 or rows != files:
        raise RuntimeError(
            f"batchery classify exited {child.returncode} with {rows} of {files} rows SUCCESS"
        )
    return Cpu(usage.ru_utime, usage.ru_stime)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.producer_cpu --files N [-- CLASSIFY ARGS]``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000, help="N: runs over N and 2N (20000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each size (3)")
    parser.add_argument(
        "--rate",
        type=float,
        default=4000.0,
        help="jobs/s the stand-in answers, 0: at once (4000, a worker core)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=64,
        help="jobs the stand-in answers together (64, a worker's batch)",
    )
    parser.add_argument(
        "classify_args",
        nargs="*",
        metavar="-- CLASSIFY ARGS",
        help="more arguments for batchery classify (e.g. -- --unordered)",
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="batchery-producer-cpu-"))
    try:
        folders = {n: make_files(work / f"in{n}", n) for n in (args.files, 2 * args.files)}
        started = time.monotonic()
        with RedisServer() as server, StandIn(server.url, QUEUE, args.rate, args.batch):

            def run(n: int) -> Cpu:
                cpu = classify_cpu(server.url, folders[n], n, args.classify_args)
                print(f"  {n} files: {cpu.line()}", file=sys.stderr)
                return cpu

            result = margin(run, args.files, args.runs)
        print(result.line())
        print(f"  (least of {args.runs} runs each; {time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
