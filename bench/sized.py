"""``python -m bench.sized``: the "sized in time" figures, within one run, alternated.

- (d) bulk: ``classify`` over N 28x28 PNG files through a worker, for this checkout and, with
  ``--against REV``, the code at REV (a git worktree, run from its own folder with the same
  virtual environment), alternating A, B, A, B; with the producer's CPU per file; then (c1)
  a lone job at a time on that idle worker (this checkout's client).
- (e) the limit beside it: the same files read, decoded by the worker's decoder and
  forwarded in-process by as many processes (``bench.run.run_limit_decoded``).
- (m) lone ``high`` jobs every 50 ms during a ``low`` bulk run, against the same lone jobs
  on the idle worker (c1), with the time budget on and off (``BATCHERY_BATCH_BUDGET_MS=0``).

Speed is never asserted: the figures are printed, for the README and docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from batchery.local import RedisServer, WorkerProcess
from bench.run import (
    ROOT,
    Row,
    make_images,
    run_bulk,
    run_limit_decoded,
    run_lone,
    run_mixed,
    wait_ready,
)
from producer.client import Client
from producer.registry import Registry
from producer.settings import Settings


def worktree(rev: str, workdir: Path) -> Path:
    """The code at ``rev``, checked out beside this one (removed by :func:`drop_worktree`)."""
    path = workdir / f"rev-{rev[:12]}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)  # fmt: skip
    return path


def cli_of(root: Path) -> str:
    """The command's module in the checkout at ``root``: ``producer.cli`` before batchery/
    was a package of its own (so a revision's worker and classify are its own, whole)."""
    return "batchery.cli" if (root / "batchery" / "cli.py").exists() else "producer.cli"


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                   check=False, capture_output=True)  # fmt: skip


def serving(url: str, root: Path, env: dict[str, str], workers: int,
            extra: tuple[str, ...] = ()) -> tuple[WorkerProcess, Client]:  # fmt: skip
    """A worker of the code at ``root``, answering; and a client (this checkout's)."""
    worker = WorkerProcess(url, "--concurrency", str(workers), "--batch-size", "64", *extra,
                           env=env, module=cli_of(root)).start()  # fmt: skip
    client = Client(settings=Settings(redis_url=url))
    probe = next((ROOT / "examples" / "digits").glob("*.png"))
    wait_ready(lambda: client.result(client.submit(probe), timeout=300) is not None, "worker")
    return worker, client


def run(n: int, workers: int, against: str | None, rounds: int,
        out: Callable[[str], None] = print, mixed: bool = True) -> list[Row]:  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="batchery-sized-"))
    here = Path.cwd()
    roots = {"this": ROOT}
    rows: list[Row] = []
    try:
        folder = workdir / "images"
        paths = make_images(folder, n, "reference")
        if against:
            roots[against] = worktree(against, workdir)
        info = Registry(Settings().model_dir).get("mnist-cnn")
        os.chdir(workdir)  # `python -m` puts the current folder first on sys.path
        for k in range(rounds):
            for name, root in roots.items():
                env = {**os.environ, "PYTHONPATH": str(root),
                       "BATCHERY_MODEL_DIR": str(root / "models")}  # fmt: skip
                with RedisServer() as server:
                    worker, client = serving(server.url, root, env, workers)
                    try:
                        row, _ = run_bulk(server.url, folder, n, env, cwd=workdir,
                                          cli=cli_of(root))  # fmt: skip
                        lone = run_lone(client, paths, 200)
                    finally:
                        client.close()
                        worker.stop()
                row.name = f"(d) bulk, {name}, round {k + 1}"
                lone.name = f"(c1) lone job on the idle worker, {name}, round {k + 1}"
                rows += [row, lone]
                out(f"  {row.name}: {row.rate:,.0f} img/s; {row.note}")
                out(f"  {lone.name}: p50 {lone.percentile(50):.2f} ms, "
                    f"p99 {lone.percentile(99):.2f} ms")  # fmt: skip
            limit = run_limit_decoded(paths[: min(n, 10_000)], info, 64, workers)
            limit.name += f", round {k + 1}"
            rows.append(limit)
            out(f"  {limit.name}: {limit.rate:,.0f} img/s")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for k in range(rounds if mixed else 0):
            for budget in ("25", "0"):
                with RedisServer() as server:
                    worker, client = serving(server.url, ROOT, env, workers,
                                             ("--batch-budget-ms", budget))  # fmt: skip
                    try:
                        idle = run_lone(client, paths, 200)
                        alone, _ = run_bulk(server.url, folder, n, env, cwd=workdir)
                        during = run_mixed(client, server.url, folder, n, env, "high", alone,
                                           idle)  # fmt: skip
                    finally:
                        client.close()
                        worker.stop()
                for row in (idle, alone, during):
                    row.name += f" [budget {budget} ms, round {k + 1}]"
                    rows.append(row)
                out(f"  budget {budget} ms: idle p50 {idle.percentile(50):.1f} p99 "
                    f"{idle.percentile(99):.1f} ms; bulk alone {alone.rate:,.0f} img/s; "
                    f"mixed p50 {during.percentile(50):.1f} p99 {during.percentile(99):.1f} "
                    f"ms, {during.note}")  # fmt: skip
    finally:
        os.chdir(here)
        for name, root in roots.items():
            if name != "this":
                drop_worktree(root)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sized", description=__doc__)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--against", metavar="REV", help="also the code at this git revision")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-mixed", action="store_true", help="leave out the (m) rows")
    args = parser.parse_args(argv)
    run(args.images, args.workers, args.against, args.rounds, mixed=not args.no_mixed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
