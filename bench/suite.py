"""``batchery bench``: every way in one run (see ``bench.run`` for the ways), the table and
the chart; ``--photos N``, the photo rows (``bench.photo_rows``). The top of the bench: it
imports the ways, none of them imports it.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from batchery.local import RedisServer, WorkerProcess
from bench.run import (
    Row,
    make_images,
    model_folder,
    run_batches,
    run_bulk,
    run_explained,
    run_limit,
    run_limit_decoded,
    run_lone,
    run_mixed,
    run_online,
    run_tutorial,
    wait_ready,
    worker_peak_rss,
)
from producer.client import Client
from producer.registry import ModelInfo
from producer.settings import Settings

# --- the whole run --------------------------------------------------------------------------


class _Rows(list[Row]):
    """Rows that print themselves as they come (a long run shows progress)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        super().__init__()
        self.out = out

    def append(self, row: Row) -> None:
        super().append(row)
        p50 = row.percentile(50)
        self.out(f"  {row.name}: {row.images} images, {row.rate:,.1f} img/s"
                 + ("" if p50 is None else f", p50 {p50:.1f} ms"))  # fmt: skip


def run_bench(model: str, images: int, workers: int, chart: Path | None,
              out: Callable[[str], None] = print,
              optimized: str | None = None) -> list[Row]:  # fmt: skip
    """Run every variant and print the table; write the chart if matplotlib is there."""
    workdir = Path(tempfile.mkdtemp(prefix="batchery-bench-"))
    rows = _Rows(out)
    try:
        out(f"preparing {images} {model} images in {workdir} ...")
        folder = workdir / "images"
        paths = make_images(folder, images, model)
        registry, info, fast = model_folder(model, workdir, optimized)
        small = paths[: min(len(paths), 300 if model == "reference" else 60)]
        medium = paths[: min(len(paths), 5000 if model == "reference" else 500)]
        batch = 64 if model == "reference" else 16
        with RedisServer() as server:
            url = server.url
            out("(a) ...")
            rows.append(run_tutorial(url, small, workers, info))
            out("(b) ...")
            rows.append(run_batches(url, medium, workers, info))
            env = {**os.environ, "BATCHERY_MODEL_DIR": str(registry.root),
                   "BATCHERY_DEFAULT_MODEL": info.name}  # fmt: skip
            settings = Settings(redis_url=url, model_dir=registry.root, default_model=info.name)
            worker = WorkerProcess(url, "--concurrency", str(workers), "--batch-size",
                                   str(batch), env=env).start()  # fmt: skip
            try:
                client = Client(settings=settings)
                wait_ready(lambda: client.result(client.submit(paths[0]), timeout=300) is not None,
                           "batchery worker")  # fmt: skip
                out("(c) ...")
                idle = run_lone(client, paths, 200 if model == "reference" else 30)
                rows.append(idle)
                rows.append(run_online(client, medium, 64))
                rows.append(run_explained(client, medium))
                out("(g) ...")
                from bench import gateway

                rows.append(gateway.run(url, env, medium))
                out("(d) ...")
                bulk, producer_rss = run_bulk(url, folder, images, env)
                rows.append(bulk)
                worker_rss = worker_peak_rss(worker)
                if fast is not None:
                    out("(d') ...")
                    rows.append(run_bulk(url, folder, images, env, fast)[0])
                out("(m) ...")
                for urgent in ("high", "normal"):
                    rows.append(run_mixed(client, url, folder, images, env, urgent, bulk, idle))
                client.close()
            finally:
                worker.stop()
            bulk.note += (f"; peak RSS producer {producer_rss / 2**20:.0f} MiB, "
                          f"worker process {worker_rss / 2**20:.0f} MiB")  # fmt: skip
            out("(e) ...")
            rows.append(run_limit_decoded(paths, info, batch, workers))
            rows.append(run_limit(medium, info, batch, threads=os.cpu_count() or 1))
            if fast is not None:
                rows.append(run_limit(medium, fast, batch, threads=os.cpu_count() or 1))
            ray_rows = run_ray(medium, info, batch, workers)
            if ray_rows:
                out("(f) ...")
            for row in ray_rows:
                rows.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out(table(rows, model, workers))
    if chart is not None:
        draw_chart(rows, model, workers, chart, out)
    return rows


def run_photo_bench(n: int, workers: int, out: Callable[[str], None] = print) -> list[Row]:
    """``--photos N``: the photo rows (bench.photo_rows) with MobileNetV2, and their table."""
    from bench.photo_rows import run_photos

    workdir = Path(tempfile.mkdtemp(prefix="batchery-photos-"))
    try:
        registry, info, _ = model_folder("mobilenet", workdir)
        rows = run_photos(n, workers, registry.root, info, workdir, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out(table(rows, f"mobilenet on {n} photos of 4000x3000", workers))
    return rows


def run_ray(paths: list[Path], info: ModelInfo, batch: int, workers: int) -> list[Row]:
    """(f1) and (f) Ray Serve, when installed (``pip install -e '.[ray]'``); else nothing."""
    try:
        ray_serve = importlib.import_module("bench.ray_serve")
    except ImportError:
        return []
    rows: list[Row] = ray_serve.run(paths, info, batch, workers)
    return rows


def table(rows: list[Row], model: str, workers: int) -> str:
    """The results as a Markdown table, with the machine they ran on."""
    base = rows[0].rate or 1.0
    lines = [
        f"model {model}, {workers} worker processes, {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}",
        "",
        "| way | images | img/s | p50 ms | p99 ms | speedup vs (a) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p50, p99 = r.percentile(50), r.percentile(99)
        lines.append(
            f"| {r.name} | {r.images} | {r.rate:,.0f} | "
            f"{'' if p50 is None else f'{p50:.1f}'} | {'' if p99 is None else f'{p99:.1f}'} | "
            f"{r.rate / base:,.1f}x | {r.note} |"
        )
    return "\n".join(lines)


def draw_chart(rows: list[Row], model: str, workers: int, path: Path,
               out: Callable[[str], None]) -> None:  # fmt: skip
    """A bar chart of img/s (needs matplotlib: ``pip install 'batchery[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out("(no chart: matplotlib is not installed; pip install 'batchery[bench]')")
        return
    rows = [r for r in rows if not r.name.startswith("(m")]  # latency rows, not throughput
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.2))
    names = [r.name.split(":")[0] if len(r.name) > 40 else r.name for r in rows]
    rates = [r.rate for r in rows]
    bars = ax.barh(names[::-1], rates[::-1], color="#4a7ab5")
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in rates[::-1]], padding=3)
    ax.set_xlabel("images per second (log scale)")
    ax.set_xscale("log")
    ax.set_title(f"batchery bench: {model}, {workers} workers, {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    out(f"chart: {path}")
