"""``batchery classify``: a whole folder (or a million files) through the queue, resumable.

The producer streams paths, packs their file bytes into chunk messages, keeps a bounded
window of jobs in flight (backpressure), collects answers with MGET and streams rows out as
they complete. Memory stays flat however many files there are: paths are never all held,
the window is bounded, and ``--resume`` remembers finished paths as 8-byte hashes.
"""

from __future__ import annotations

import base64
import csv
import glob
import hashlib
import json
import os
import stat
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from producer.client import MAX_PUSH_BYTES, Client
from producer.errors import BatcheryError, ImageTooLargeError, InvalidImageError
from producer.images import IMAGE_EXTENSIONS, check_image_bytes, read_file, shrink
from producer.stopping import stop_on_signals
from producer.waiting import Pace
from producer.wire import FAILURE, Job, new_job_ids

COLUMNS = ("path", "job_id", "status", "label", "score", "error")

#: Most Redis memory a run's jobs in flight may hold, by default.
WINDOW_BYTES = 64 * 1024 * 1024
#: What a message costs Redis, in copies of it: one on the queue (then in kombu's unacked
#: hash), one in the ledger, and one passing through Redis's buffers as it is pushed or taken.
REDIS_COPIES = 3

#: Answers are looked for among the oldest jobs in flight, this many at a time: jobs finish
#: roughly in the order they were sent, so the head of the window is where answers are.
POLL = 512


# --- inputs ---------------------------------------------------------------------------------


def iter_inputs(specs: Iterable[str]) -> Iterator[str]:
    """Image paths named by ``specs``, streamed: files, directories (recursive, sorted),
    globs, and ``@list.txt`` files of one path a line."""
    for spec in specs:
        if spec.startswith("@"):
            with open(spec[1:], encoding="utf-8") as listing:
                for line in listing:
                    if line.strip():
                        yield line.strip()
        elif os.path.isdir(spec):
            yield from _walk(spec)
        elif glob.has_magic(spec):
            for match in glob.iglob(spec, recursive=True):
                if os.path.isdir(match):
                    yield from _walk(match)
                else:
                    yield match
        else:
            yield spec  # a file, or a missing one whose row will say so


def _walk(root: str) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(folder, name)


def count_inputs(specs: Iterable[str]) -> int:
    """How many paths :func:`iter_inputs` will yield (a walk, holding nothing)."""
    return sum(1 for _ in iter_inputs(specs))


# --- output ---------------------------------------------------------------------------------


def _path_hash(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


class DonePaths:
    """Paths already in an output file, as a sorted array of 64-bit hashes (8 bytes a path)."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._hashes = np.sort(np.fromiter((_path_hash(p) for p in paths), np.uint64))

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, str) or not len(self._hashes):
            return False
        h = np.uint64(_path_hash(path))
        i = int(np.searchsorted(self._hashes, h))
        return i < len(self._hashes) and self._hashes[i] == h


def _repair_tail(out: Path) -> None:
    """Drop a last line cut short by an interrupted run, so appended rows start clean."""
    with out.open("rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        back = min(size, 1 << 16)
        fh.seek(size - back)
        tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        fh.truncate(size - back + cut + 1 if cut >= 0 else 0)


class RowWriter:
    """Rows to a ``.jsonl`` or ``.csv`` file, appended and flushed as they come."""

    def __init__(self, out: Path, resume: bool, columns: tuple[str, ...] = COLUMNS) -> None:
        self.columns = columns
        suffix = out.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise BatcheryError(f"{out}: the output must end in .jsonl or .csv")
        self.csv = suffix == ".csv"
        existing = resume and out.exists() and out.stat().st_size > 0
        if existing:
            _repair_tail(out)
        self.done = DonePaths(self._read_paths(out) if existing else ())
        self._fh: IO[str] = out.open("a" if resume else "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._fh) if self.csv else None
        if self._csv is not None and not (existing and out.stat().st_size > 0):
            self._csv.writerow(columns)
        self._last_flush = time.monotonic()

    def _read_paths(self, out: Path) -> Iterator[str]:
        with out.open(encoding="utf-8", newline="") as fh:
            if self.csv:
                reader = csv.reader(fh)
                next(reader, None)
                yield from (row[0] for row in reader if row)
            else:
                yield from (json.loads(line)["path"] for line in fh if line.strip())

    def write(self, row: dict[str, Any]) -> None:
        """Append one row; flushed to disk at least twice a second."""
        if self._csv is not None:
            self._csv.writerow(["" if row[c] is None else row[c] for c in self.columns])
        else:
            self._fh.write(json.dumps({c: row[c] for c in self.columns}) + "\n")
        now = time.monotonic()
        if now - self._last_flush > 0.5:
            self._fh.flush()
            self._last_flush = now

    def close(self) -> None:
        """Flush and close."""
        self._fh.close()


# --- the run --------------------------------------------------------------------------------


@dataclass
class Summary:
    """What a classify run did."""

    counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    #: Jobs in flight cancelled when the run was interrupted.
    cancelled: int = 0

    @property
    def total(self) -> int:
        """Rows written by this run."""
        return sum(self.counts.values())

    def line(self) -> str:
        """One line for the terminal."""
        rate = self.total / self.elapsed_s if self.elapsed_s else 0.0
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing"
        skipped = f", skipped {self.skipped} already done" if self.skipped else ""
        stop = (
            f" (interrupted: {self.cancelled} jobs in flight cancelled; run again with --resume)"
            if self.interrupted
            else ""
        )
        return (
            f"classified {self.total}: {counts}{skipped} in {self.elapsed_s:.1f} s, "
            f"{rate:,.0f} img/s{stop}"
        )


def _row(path: str, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, "job_id": job_id, "status": result["status"],
            "label": result.get("label"), "score": result.get("score"),
            "error": result.get("error")}  # fmt: skip


def classify(
    client: Client,
    specs: list[str],
    out: Path,
    model: str | None = None,
    version: str | None = None,
    resume: bool = False,
    ordered: bool = True,
    window: int = 4096,
    progress: IO[str] | None = sys.stderr,
    keep_results: bool = False,
    priority: str = "low",
    deadline_s: float | None = None,
    explain_dir: Path | None = None,
    window_bytes: int = WINDOW_BYTES,
    shrink_to: tuple[tuple[int, int], str] | None = None,
    shared_fs: bool = False,
) -> Summary:
    """Classify every image ``specs`` name into ``out``; see the module docstring.

    At most ``window`` jobs are in flight, and at most ``window_bytes`` of Redis memory
    (:data:`REDIS_COPIES` of each message), whatever the images' sizes.
    ``shrink_to`` ((width, height), mode): each image is decoded at reduced scale and brought
    to the model's size here, and travels as a lossless PNG of exactly what the worker would
    have computed (``images.shrink``). ``shared_fs``: jobs carry the file's real path, and
    workers read it themselves (under their BATCHERY_SHARED_ROOTS); here it is only checked
    to be a regular file within the byte limit.

    Jobs go at ``priority`` (``low`` by default: bulk work gives way to jobs someone is
    waiting for). Interrupted (Ctrl-C, SIGTERM), the run cancels the jobs it has in flight
    before it returns, so workers don't compute them for nobody; ``resume`` picks them up.
    With ``explain_dir``, each answer's heatmap is written there as a PNG, its path in the
    row's ``explanation`` column.

    What a small file costs this process is bounded (``python -m bench.producer_cpu``
    measures it): it is read in line, in four system calls, unless the files are large or
    shrunk (then threads read ahead); answers are looked for with a probe of a few keys, and
    fetched in full only where the probe found some.
    """
    template = client.job_template(model, version, priority, deadline_s, notify=False,
                                   explain=explain_dir is not None)  # fmt: skip
    columns = COLUMNS if explain_dir is None else (*COLUMNS, "explanation")
    if explain_dir is not None:
        Path(explain_dir).mkdir(parents=True, exist_ok=True)
    writer = RowWriter(Path(out), resume, columns)
    summary = Summary()
    started = time.monotonic()
    # The total only shows on the progress bar: no bar, no second walk of the inputs.
    total = count_inputs(specs) if progress is not None else None
    bar = tqdm(total=total, unit="img", file=progress, disable=progress is None,
               dynamic_ncols=True, smoothing=0.05)  # fmt: skip
    chunk = client.settings.chunk_size
    limit, max_pixels = client.settings.max_image_bytes, client.settings.max_image_pixels
    # In flight, in input order: key -> (path, job id, the Redis bytes its message holds). A
    # refused input has no job id; its answer is known at once, and its row still comes in
    # its place.
    inflight: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
    holding = 0
    answered: dict[str, dict[str, Any]] = {}
    collected: list[str] = []
    ids = _job_ids()
    # Refill the window once this many jobs have left it (or it is empty): pushes of a chunk
    # or more, not one per answered batch.
    refill = max(1, min(chunk, window // 4))

    def prepare(path: str) -> Any:
        if path in writer.done:
            return _SKIP
        return job_input(path, limit, max_pixels, shrink_to, shared_fs)

    if shrink_to is not None:
        # Pillow decodes and zlib encodes without the GIL: --shrink uses every core the
        # workers leave free, a few files ahead.
        prepared = _ahead(iter_inputs(specs), prepare, min(4, os.cpu_count() or 1))
    elif shared_fs:
        prepared = _in_line(iter_inputs(specs), prepare)  # a stat a file: nothing to overlap
    else:
        prepared = _read_ahead_when_large(iter_inputs(specs), prepare, min(4, os.cpu_count() or 1))
    exhausted = False
    waiting: list[str] = []  # the oldest jobs in flight with no answer yet
    stale = True  # whether ``waiting`` must be listed again
    # Ctrl-C or SIGTERM: a KeyboardInterrupt, and a flag the loop checks, for an interrupt
    # Python dropped in a finalizer (producer.stopping).
    signals = stop_on_signals()
    stop = signals.__enter__()
    try:
        pace = Pace()  # answers found since the first push: their rate paces looks
        while not exhausted or inflight:
            if stop.is_set():
                raise KeyboardInterrupt
            # Fill the window, up to ``window`` jobs in flight, pushed 16 chunks a round trip.
            jobs: list[Job] = []
            pending = 0
            if len(inflight) + refill <= window or not inflight:
                while (not exhausted and len(inflight) < window
                       and (holding < window_bytes or not holding)):  # fmt: skip
                    item = next(prepared, None)
                    if item is None:
                        exhausted = True
                        continue
                    path, made = item
                    if made is _SKIP:
                        summary.skipped += 1
                        bar.update(1)
                        continue
                    stale = True
                    if isinstance(made, (OSError, InvalidImageError)):
                        key = next(ids)
                        inflight[key] = (path, "", 0)
                        answered[key] = {"status": FAILURE, "error": _reason(made, path)}
                    elif isinstance(made, BaseException):
                        raise made
                    else:
                        job = template.stamped(
                            next(ids), made.get("image", b""), time.time(), made.get("path"),
                            made.get("source_bytes", 0),
                        )  # fmt: skip
                        jobs.append(job)
                        size = REDIS_COPIES * job.wire_size()
                        inflight[job.id] = (path, job.id, size)
                        holding += size
                        pending += size
                        if len(jobs) >= chunk * 16 or pending >= min(
                            window_bytes // 4, MAX_PUSH_BYTES // 2
                        ):
                            client.enqueue(jobs)
                            pace.start()
                            jobs, pending = [], 0
                client.enqueue(jobs)
                if jobs:
                    pace.start()

            # Look for answers among the oldest jobs in flight (producer.waiting: a probe of
            # every STEP-th, then the jobs up to the last probe answered). Results written out
            # are forgotten in the same round trip.
            if stale:
                waiting = [key for key in islice(inflight, POLL) if key not in answered]
                stale = False
            found = client.waiter.look(waiting, STEP, forget=[] if keep_results else collected)
            collected = []
            if found:
                answered.update(found)
                stale = True

            # Emit rows: in input order, or as they come.
            ready = (
                _ordered_ready(inflight, answered)
                if ordered
                else [key for key in answered if key in inflight]
            )
            if ready:
                stale = True
                for key in ready:
                    path, job_id, size = inflight.pop(key)
                    holding -= size
                    result = answered.pop(key)
                    row = _row(path, job_id, result)
                    if explain_dir is not None:
                        row["explanation"] = write_heatmap(Path(explain_dir), path, result)
                    writer.write(row)
                    summary.counts[result["status"]] += 1
                    if job_id:
                        collected.append(job_id)
                bar.update(len(ready))
            # Look again at once if the window can be filled or this look found a good share,
            # else after the pace's pause (about a 16th of the jobs in flight answered at the
            # rate seen so far; twice as long each time a look finds none).
            pace.record(len(found), len(inflight))
            room = (
                not exhausted
                and (len(inflight) + refill <= window or not inflight)
                and (holding < window_bytes or not holding)
            )
            if not room:
                pace.wait(len(found), len(inflight))
        if stop.is_set():
            raise KeyboardInterrupt
        if collected and not keep_results:
            client.fetch([], forget=collected)
    except KeyboardInterrupt:
        summary.interrupted = True
        in_flight = [job_id for _, job_id, _ in inflight.values() if job_id]
        try:
            summary.cancelled = sum(client.cancel_many(in_flight))
        except BatcheryError as exc:  # Redis away: the jobs will be computed, and dropped
            print(f"batchery: could not cancel the jobs in flight: {exc}", file=sys.stderr)
    finally:
        try:
            prepared.close()
            bar.close()
        finally:
            writer.close()  # whole rows: each is one write, flushed here
            signals.__exit__(None, None, None)
            summary.elapsed_s = time.monotonic() - started
    return summary


#: A look for answers probes every STEP-th of the oldest jobs waiting (see classify).
STEP = 32


def _job_ids() -> Iterator[str]:
    """Fresh job ids without end, made 256 at a time."""
    while True:
        yield from new_job_ids(256)


def write_heatmap(folder: Path, path: str, result: dict[str, Any]) -> str | None:
    """The row's heatmap written to ``folder`` (named by the input's path); its path."""
    png = (result.get("explanation") or {}).get("png")
    if not png:
        return None
    target = folder / f"{_path_hash(path):016x}-{Path(path).stem}.png"
    target.write_bytes(base64.b64decode(png))
    return str(target)


_SKIP = object()

#: Files read in line while the last ones averaged less than this; bigger ones are read a
#: few ahead, on threads: their reading may wait on a disk, and a thread's handoff (a few
#: tens of microseconds of locks and wake-ups) is small beside it. A small file is read in
#: less time than a handoff takes.
LARGE_FILE = 256 * 1024


def _attempt(work: Callable[[str], Any], item: str) -> Any:
    try:
        return work(item)
    except Exception as exc:
        return exc


def _in_line(items: Iterator[str], work: Callable[[str], Any]
             ) -> Generator[tuple[str, Any], None, None]:  # fmt: skip
    """Each item with what ``work(item)`` returned or raised, in order, worked on here."""
    for item in items:
        yield item, _attempt(work, item)


def _ahead(items: Iterator[str], work: Callable[[str], Any], threads: int
           ) -> Generator[tuple[str, Any], None, None]:  # fmt: skip
    """Each item with what ``work(item)`` returned or raised, in order, worked on ``threads``
    at a time and at most twice that many ahead of the consumer."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[tuple[str, Future[Any]]] = deque()
        for item in items:
            pending.append((item, pool.submit(_attempt, work, item)))
            if len(pending) > 2 * threads:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


def _read_ahead_when_large(items: Iterator[str], work: Callable[[str], Any], threads: int
                           ) -> Generator[tuple[str, Any], None, None]:  # fmt: skip
    """Each item with what ``work(item)`` returned or raised, in order: worked on here while
    the files read are small (a running mean under :data:`LARGE_FILE`), as :func:`_ahead`
    while they are large."""
    pool: ThreadPoolExecutor | None = None
    pending: deque[tuple[str, Future[Any]]] = deque()
    mean = 0.0

    def weigh(made: Any) -> None:
        nonlocal mean
        if isinstance(made, dict):
            mean += (len(made.get("image", b"")) - mean) / 8

    try:
        for item in items:
            if mean >= LARGE_FILE:
                if pool is None:
                    pool = ThreadPoolExecutor(threads)
                pending.append((item, pool.submit(_attempt, work, item)))
                if len(pending) > 2 * threads:
                    first, future = pending.popleft()
                    made = future.result()
                    weigh(made)
                    yield first, made
                continue
            while pending:  # small again: what was read ahead first, in its place
                first, future = pending.popleft()
                made = future.result()
                weigh(made)
                yield first, made
            made = _attempt(work, item)
            weigh(made)
            yield item, made
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def job_input(
    path: str, limit: int, max_pixels: int, shrink_to: tuple[tuple[int, int], str] | None,
    shared_fs: bool,
) -> dict[str, Any]:  # fmt: skip
    """What a job carries for ``path``: its bytes, its shrunk bytes, or its real path."""
    if shared_fs:
        real = os.path.realpath(path)
        try:
            info = os.stat(real)
        except FileNotFoundError as exc:
            raise InvalidImageError(f"{path}: no such file") from exc
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise ImageTooLargeError(f"{path}: {info.st_size} bytes is over the limit of "
                                     f"{limit} bytes (BATCHERY_MAX_IMAGE_BYTES)")  # fmt: skip
        return {"path": real, "source_bytes": info.st_size}
    data = read_checked(path, limit, max_pixels)
    if shrink_to is not None:
        try:
            return {"image": shrink(data, *shrink_to, limit, max_pixels),
                    "source_bytes": len(data)}  # fmt: skip
        except InvalidImageError as exc:
            raise InvalidImageError(f"{path}: {exc}") from exc
    return {"image": data}


def read_checked(path: str, limit: int, max_pixels: int) -> bytes:
    """A file's bytes, if it is a whole image within the limits (bytes checked before reading)."""
    data = read_file(path, limit)
    check_image_bytes(data, path, limit, max_pixels)
    return data


def _ordered_ready(inflight: OrderedDict[str, Any], answered: dict[str, Any]) -> list[str]:
    ready = []
    for key in inflight:
        if key not in answered:
            break
        ready.append(key)
    return ready


def _reason(exc: Exception, path: str) -> str:
    # read_file names missing files, folders and devices itself; what is left is I/O.
    if isinstance(exc, OSError) and not isinstance(exc, InvalidImageError):
        return f"{path}: cannot read ({exc.strerror or exc})"
    return str(exc)
