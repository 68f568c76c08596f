"""``batchery bench``: one Redis, one model, the same images and worker count, six ways.

(a) the tutorial way: one Celery task per image calling ``model.predict``;
(b) celery-batches, flush_every=64, one task per image, results read by MGET;
(c) Batchery online: single jobs from 64 concurrent submitters (and, as c1, one at a time
    on an idle worker: the latency of a lone job);
(d) Batchery bulk: ``batchery classify`` over the files on disk;
(e) the limit: the same files read, decoded by the worker's decoder and forwarded in-process,
    by as many processes and at the same batch size as the worker; (e0) the same model on
    images decoded beforehand (the decode-free figure);
(f) Ray Serve with ``@serve.batch`` over HTTP, when ray[serve] is installed;
(g) Batchery over HTTP: the (c) clients, each request through ``batchery serve``;
(x) the (c) images submitted at once with ``explain=True``, beside the same without;
(d') and (e') with ``--optimized METHOD``: the same model optimised to LiteRT, in bulk and
    in-process;
(m) mixed load: a lone job every 50 ms at high priority while a ``classify`` of the files runs
    at its default (low) priority, and (m0) the same with everything at normal.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from batchery.local import WorkerProcess
from producer.client import Client
from producer.registry import ModelInfo, Registry
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


@dataclass
class Row:
    """One line of the table."""

    name: str
    images: int
    seconds: float
    latencies: list[float] | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        """Images per second."""
        return self.images / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        """Latency percentile in ms, if latencies were measured."""
        if not self.latencies:
            return None
        return float(np.percentile(self.latencies, q) * 1000)


# --- set-up -----------------------------------------------------------------------------------


def make_images(folder: Path, n: int, model: str) -> list[Path]:
    """``n`` image files: the example digits, or for mobilenet 224x224 RGB JPEGs of them."""
    sources = sorted(DIGITS.glob("*.png"))
    paths = []
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        src = sources[i % len(sources)]
        if model == "reference":
            path = sub / f"{i:07d}.png"
            shutil.copyfile(src, path)
        else:
            path = sub / f"{i:07d}.jpg"
            if i < len(sources):
                with Image.open(src) as img:
                    img.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC).save(
                        path, quality=90
                    )
            else:
                shutil.copyfile(sub.parent / "0000" / f"{i % len(sources):07d}.jpg", path)
        paths.append(path)
    return paths


def model_folder(
    model: str, workdir: Path, optimized: str | None = None
) -> tuple[Registry, ModelInfo, ModelInfo | None]:
    """A registry holding the model under test, and its ``optimized`` version if asked."""
    registry, info = _model_folder(model, workdir, private=optimized is not None)
    if optimized is None:
        return registry, info, None
    from worker.optimize import optimize

    calibration = workdir / "calibration"
    for path in sorted(DIGITS.glob("*.png")):  # the example digits, <label>/ folders
        (calibration / path.stem.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, calibration / path.stem.split("_")[0] / path.name)
    return registry, info, optimize(registry, info, optimized, calibration_dir=calibration)


def _model_folder(model: str, workdir: Path, private: bool) -> tuple[Registry, ModelInfo]:
    if model == "reference":
        shipped = Registry(Settings().model_dir).get("mnist-cnn")
        if not private:
            return Registry(Settings().model_dir), shipped
        registry = Registry(workdir / "models")  # never publish into the repo's registry
        info = registry.publish(shipped.file, "mnist-cnn", shipped.labels, shipped.input_shape,
                                extra={"metrics": shipped.meta.get("metrics", {})})  # fmt: skip
        return registry, info
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    registry = Registry(workdir / "models")
    net = tf.keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), weights=None, classes=10
    )  # random weights: the model, not the queue, is the cost
    file = workdir / "mobilenet.keras"
    net.save(file)
    info = registry.publish(
        file, "mobilenet", [str(d) for d in range(10)], (224, 224, 3), "RGB", 1 / 127.5, -1.0
    )
    return registry, info


@contextmanager
def celery_worker(url: str, queue: str, workers: int, model: ModelInfo,
                  full_decode: bool = False) -> Iterator[None]:  # fmt: skip
    """A stock ``celery worker`` for the baselines, stopped afterwards (``full_decode``: it
    decodes every pixel of an image, then resizes, as a tutorial does)."""
    env = {**os.environ, "BATCHERY_REDIS_URL": url, "BENCH_MODEL_PATH": str(model.path)}
    if full_decode:
        env["BENCH_FULL_DECODE"] = "1"
    log = open(tempfile.mkstemp(prefix="bench-celery-", suffix=".log")[1], "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.baselines:app", "worker", "-Q", queue,
         "-c", str(workers), "--loglevel", "WARNING", "-n", f"{queue}@%h", "--without-mingle",
         "--without-gossip"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def wait_ready(probe: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll ``probe`` until it is true."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {timeout:g} s")
        time.sleep(0.2)


# --- the variants ---------------------------------------------------------------------------


def run_tutorial(url: str, paths: list[Path], workers: int, info: ModelInfo,
                 full_decode: bool = False) -> Row:  # fmt: skip
    """(a) one task per image, model.predict, AsyncResult.get() per result."""
    from bench.baselines import app

    app.conf.broker_url = app.conf.result_backend = url
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    with celery_worker(url, "bench-a", workers, info, full_decode):
        warm = app.send_task("bench.tutorial", (encoded[0],), queue="bench-a")
        warm.get(timeout=300)
        started = time.perf_counter()
        sent = [(time.perf_counter(), app.send_task("bench.tutorial", (e,), queue="bench-a"))
                for e in encoded]  # fmt: skip
        latencies = []
        for at, result in sent:
            result.get(timeout=600)
            latencies.append(time.perf_counter() - at)
        seconds = time.perf_counter() - started
    name = "(a) tutorial: task per image, model.predict"
    return Row(name + (", full decode" if full_decode else ""), len(paths), seconds, latencies)


def run_batches(url: str, paths: list[Path], workers: int, info: ModelInfo,
                full_decode: bool = False) -> Row:  # fmt: skip
    """(b) celery-batches flush_every=64, one task per image, results read by MGET."""
    from bench.baselines import app

    app.conf.broker_url = app.conf.result_backend = url
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    r = redis.Redis.from_url(url)
    with celery_worker(url, "bench-b", workers, info, full_decode):
        app.send_task("bench.batches", (encoded[0],), queue="bench-b").get(timeout=300)
        started = time.perf_counter()
        sent_at: dict[str, float] = {}
        for e in encoded:
            sent_at[app.send_task("bench.batches", (e,), queue="bench-b").id] = time.perf_counter()
        latencies = _collect_by_mget(r, sent_at)
        seconds = time.perf_counter() - started
    name = "(b) celery-batches, flush_every=64" + (", full decode" if full_decode else "")
    return Row(name, len(paths), seconds, latencies)


def _collect_by_mget(r: redis.Redis, sent_at: dict[str, float]) -> list[float]:
    waiting = list(sent_at)
    latencies = []
    while waiting:
        values = r.mget([f"celery-task-meta-{i}" for i in waiting[:2000]])
        now = time.perf_counter()
        done = {i for i, v in zip(waiting[:2000], values, strict=True) if v is not None}
        latencies += [now - sent_at[i] for i in done]
        waiting = [i for i in waiting if i not in done]
        if not done:
            time.sleep(0.002)
    return latencies


def concurrently(clients: int, client: Callable[[int], list[float]]) -> tuple[float, list[float]]:
    """Run ``client(k)`` for k in range(clients), each in its own thread, all at once.

    Each returns its latencies; returns the wall time and all latencies. Raises if any failed.
    """
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(k: int) -> None:
        try:
            mine = client(k)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed, first: {errors[0]!r}")
    return seconds, latencies


def run_online(client: Client, paths: list[Path], submitters: int) -> Row:
    """(c) single jobs from ``submitters`` concurrent threads, each submit then wait."""
    data = [p.read_bytes() for p in paths]
    per_thread = len(data) // submitters

    def submitter(k: int) -> list[float]:
        mine = []
        for j in range(per_thread):
            at = time.perf_counter()
            job = client.submit(data[(k * per_thread + j) % len(data)])
            if client.result(job, timeout=120)["status"] != "SUCCESS":
                raise RuntimeError(f"job {job} failed")
            mine.append(time.perf_counter() - at)
        return mine

    seconds, latencies = concurrently(submitters, submitter)
    name = f"(c) Batchery online, {submitters} concurrent submitters"
    return Row(name, len(latencies), seconds, latencies)


def run_explained(client: Client, paths: list[Path]) -> Row:
    """(x) the same jobs submitted at once, with ``explain=True``, beside the run without."""
    data = [p.read_bytes() for p in paths]

    def timed(explain: bool) -> float:
        started = time.perf_counter()
        results = client.results(client.submit_many(data, explain=explain), timeout=600)
        if any(r["status"] != "SUCCESS" or (explain and "explanation" not in r)
               for r in results):  # fmt: skip
            raise RuntimeError("a job was not answered with what it asked for")
        return time.perf_counter() - started

    plain, explained = timed(False), timed(True)
    extra_ms = (explained - plain) / len(data) * 1000
    return Row("(x) Batchery, jobs with explain=True, one submit_many", len(data), explained,
               note=f"the same without explain: {len(data) / plain:,.0f} img/s; "
               f"explaining costs {extra_ms:+.2f} ms a job")  # fmt: skip


def one_at_a_time(name: str, n: int, call: Callable[[], object]) -> Row:
    """``call()`` n times, one after the other with a short idle pause: a lone request's latency."""
    latencies = []
    started = time.perf_counter()
    for _ in range(n):
        at = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - at)
        time.sleep(0.005)  # idle between requests
    return Row(name, n, sum(latencies), latencies,
               note=f"{time.perf_counter() - started:.1f} s wall with pauses")  # fmt: skip


def run_lone(client: Client, paths: list[Path], n: int = 200) -> Row:
    """(c1) one job at a time on an idle worker: submit to result."""
    data = paths[0].read_bytes()
    return one_at_a_time("(c1) Batchery, one job at a time (idle worker)", n,
                         lambda: client.result(client.submit(data), timeout=60))  # fmt: skip


def run_bulk(
    url: str, folder: Path, n: int, env: dict[str, str], model: ModelInfo | None = None,
    flags: tuple[str, ...] = (), cwd: Path = ROOT, cli: str = "batchery.cli",
) -> tuple[Row, int]:  # fmt: skip
    """(d) `batchery classify` over the files; returns the row and the producer's peak RSS.

    With ``model``, (d') the same through that version (an optimised one); ``flags`` go to
    ``classify`` as they are."""
    out = folder.parent / "bulk.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", cli, "classify", str(folder), "-o", str(out),
           *flags]  # fmt: skip
    if model is not None:
        cmd += ["--model", model.key]
    # The progress bar goes to a file, not a pipe: a long run writes more than a pipe holds,
    # and a pipe read only at the end would stop classify mid-run.
    log = folder.parent / "bulk.stderr"
    started = time.perf_counter()
    with log.open("w") as errors:
        proc = subprocess.Popen(cmd, env={**env, "BATCHERY_REDIS_URL": url},
                                stderr=errors, text=True, cwd=cwd)  # fmt: skip
        peak = 0
        while True:
            # wait4: the producer's own CPU (and its read-ahead processes'), not the bench's.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            peak = max(peak, peak_rss(proc.pid))
            time.sleep(0.05)
    seconds = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    stderr = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"classify failed: {stderr[-2000:]}")
    rows = sum(1 for _ in out.open())
    summary = stderr.strip().splitlines()[-1]
    name = "(d) Batchery bulk: classify files on disk"
    if model is not None:
        name = f"(d') Batchery bulk, {model.meta['optimized']['method']} LiteRT {model.key}"
    return Row(name, rows, seconds,
               note=f"incl. start-up; {summary.split(' in ')[-1]}; producer CPU "
               f"{cpu / max(1, rows) * 1e6:.0f} µs a job ({cpu:.1f} s in all, "
               "start-up included)"), peak  # fmt: skip


def run_mixed(client: Client, url: str, folder: Path, n: int, env: dict[str, str],
              urgent: str, bulk_alone: Row, idle: Row) -> Row:  # fmt: skip
    """(m) a lone job every 50 ms at ``urgent`` priority while ``classify`` runs at its
    default (low) priority; (m0) with ``urgent`` normal, the bulk run is normal too."""
    out = folder.parent / f"mixed-{urgent}.jsonl"
    bulk_priority = "low" if urgent == "high" else "normal"
    cmd = [sys.executable, "-m", "batchery.cli", "classify", str(folder), "-o", str(out),
           "--priority", bulk_priority]  # fmt: skip
    data = next(folder.rglob("*.*")).read_bytes()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**env, "BATCHERY_REDIS_URL": url},
                            stderr=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
    latencies = []
    while proc.poll() is None:
        at = time.perf_counter()
        client.result(client.submit(data, priority=urgent), timeout=60)
        latencies.append(time.perf_counter() - at)
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - at)))
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"classify failed with exit code {proc.returncode}")
    rate = n / seconds
    name = ("(m) lone high jobs every 50 ms during a low bulk run" if urgent == "high"
            else "(m0) the same, everything at normal priority")  # fmt: skip
    return Row(name, len(latencies), sum(latencies), latencies,
               note=f"bulk {rate:,.0f} img/s meanwhile, {rate / bulk_alone.rate:.0%} "
               f"of (d) alone; idle p99 {idle.percentile(99) or 0:.1f} ms (c1)")  # fmt: skip


def run_limit(paths: list[Path], info: ModelInfo, batch_size: int, threads: int) -> Row:
    """(e) the model in-process on the decoded images, ``batch_size`` at a time."""
    from worker import preprocess
    from worker.models import load

    pixels = np.stack([preprocess.decode(p.read_bytes(), info, 1 << 30, 1 << 30) for p in paths])
    inputs = preprocess.normalize(pixels, info)
    model = load(info, batch_size, threads=threads)
    started = time.perf_counter()
    model.predict(inputs)
    seconds = time.perf_counter() - started
    name = f"(e0) decode-free: in-process on decoded images, batch {batch_size}, {threads} threads"
    if info.format == "litert":
        name = f"(e') the limit, {info.meta['optimized']['method']} LiteRT, batch {batch_size}"
    return Row(name, len(paths), seconds)


def _limit_process(paths: list[Path], info: ModelInfo, batch_size: int, threads: int,
                   ready: Any, results: Any) -> None:  # fmt: skip
    """One process of (e): load and warm the model, wait for the others, then read, decode
    (the worker's decoder) and forward its share of the files, ``batch_size`` at a time."""
    from worker import preprocess
    from worker.models import load

    model = load(info, batch_size, threads=threads)
    warm = preprocess.decode(paths[0].read_bytes(), info, 1 << 30, 1 << 30)
    model.predict(preprocess.normalize(np.stack([warm] * batch_size), info))
    ready.wait()
    started = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        pixels = [preprocess.decode(p.read_bytes(), info, 1 << 30, 1 << 30)
                  for p in paths[i : i + batch_size]]  # fmt: skip
        model.predict(preprocess.normalize(np.stack(pixels), info))
    results.put(time.perf_counter() - started)


def run_limit_decoded(paths: list[Path], info: ModelInfo, batch_size: int,
                      workers: int) -> Row:  # fmt: skip
    """(e) the limit a worker is measured against: ``workers`` processes (as many threads
    each as a worker's pool process has) reading each file, decoding it with the worker's
    own decoder and forwarding ``batch_size`` at a time; no queue, no Redis."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no TensorFlow state forked
    ready, results = context.Barrier(workers + 1), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    shares = [paths[k::workers] for k in range(workers)]
    procs = [context.Process(target=_limit_process,
                             args=(share, info, batch_size, threads, ready, results))
             for share in shares]  # fmt: skip
    for proc in procs:
        proc.start()
    ready.wait(timeout=600)
    started = time.perf_counter()
    seconds = [results.get(timeout=3600) for _ in procs]
    wall = time.perf_counter() - started
    for proc in procs:
        proc.join()
    name = (f"(e) the limit: read + decode + forward in-process, {workers} processes, "
            f"batch {batch_size}")  # fmt: skip
    return Row(name, len(paths), wall,
               note=f"slowest process {max(seconds):.2f} s; the worker's decoder")  # fmt: skip


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far, in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_peak_rss(worker: WorkerProcess) -> int:
    """The largest peak RSS among a worker's processes."""
    if worker.process is None:
        return 0
    pids = [worker.process.pid]
    children = Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return max(peak_rss(p) for p in pids)
