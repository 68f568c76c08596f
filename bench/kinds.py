"""The two worker kinds side by side: cold start, memory, bulk throughput (the README's table).

``python -m bench.kinds [--images 20000] [--rounds 2]``. A throwaway redis-server; for each
worker kind (``full``: TensorFlow; ``lite``: LiteRT only, run here in a process that cannot
import TensorFlow, as on a host without it), alternated round by round:

- **cold start**: a job for the version is queued first; the clock starts when ``batchery
  worker`` is started and stops when that job's answer is stored (process start, imports,
  model load, warm-up, first batch);
- **memory**: each pool process's PSS (``/proc/PID/smaps_rollup``: shared pages split among
  the processes sharing them) once it has served, and the worker's whole tree;
- **bulk**: ``batchery classify`` over ``--images`` 28x28 PNG files (copies of
  examples/digits) through that worker (two pool processes), img/s.

Rows: the TensorFlow worker serving the promoted Keras version (``mnist-cnn@2``), the same
worker serving the int8 LiteRT version (``@3``), the lite worker serving ``@3``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchery.local import RedisServer
from producer.client import Client
from producer.settings import Settings
from producer.wire import HEARTBEAT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
NO_TF = ROOT / "tests" / "integration" / "no_tensorflow"
DIGITS = sorted((ROOT / "examples" / "digits").glob("*.png"))


def pss_kib(pid: int) -> int:
    """A process's proportional set size, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(p) for p in found]


def start(kind: str, url: str, log: Path, extra: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:  # fmt: skip
    env = {**os.environ, "BATCHERY_REDIS_URL": url, "BATCHERY_WORKER_KIND": kind, **(extra or {})}
    if kind == "lite":
        env["PYTHONPATH"] = f"{NO_TF}:{ROOT}"
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "batchery.cli", "worker",
                                 "--concurrency", "2"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def measure(kind: str, version: str, url: str, folder: Path, tmp: Path,
            extra: dict[str, str] | None = None) -> dict[str, float]:  # fmt: skip
    with Client(settings=Settings(redis_url=url)) as client:
        [first] = client.submit_many([DIGITS[0]], version=version)
        began = time.perf_counter()
        proc = start(kind, url, tmp / f"{kind}.log", extra)
        try:
            result = client.result(first, timeout=300)
            cold = time.perf_counter() - began
            assert result["status"] == "SUCCESS", result
            warm = client.submit_many(DIGITS * 2, version=version)
            client.results(warm, timeout=120)
            lone = []
            for path in DIGITS[:100] * 2:  # one job at a time, each waited for
                t0 = time.perf_counter()
                client.result(client.submit(path, version=version), timeout=30)
                lone.append(time.perf_counter() - t0)
            pool = children(proc.pid)
            pss = [pss_kib(p) for p in pool]
            tree = pss_kib(proc.pid) + sum(pss)
            out = tmp / "bulk.jsonl"
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "batchery.cli", "classify", str(folder),
                                   "-o", str(out), "--model", f"mnist-cnn@{version}"],
                                  env={**os.environ, "BATCHERY_REDIS_URL": url},
                                  capture_output=True, text=True)  # fmt: skip
            seconds = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            rows = sum(1 for _ in out.open())
        finally:
            stop(proc)
            # The next worker is judged by the heartbeats up: wait for this one's to go.
            deadline = time.monotonic() + 20
            while client.redis.keys(f"{HEARTBEAT_PREFIX}*") and time.monotonic() < deadline:
                time.sleep(0.2)
    return {"cold_s": cold, "pool_pss_mib": max(pss) / 1024 if pss else 0.0,
            "lone_p50_ms": sorted(lone)[len(lone) // 2] * 1000,
            "tree_pss_mib": tree / 1024, "img_s": rows / seconds, "images": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kinds")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--monitoring",
        action="store_true",
        help="instead: the TensorFlow worker on @2 with monitoring on and off",
    )
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="batchery-kinds-"))
    folder = tmp / "in"
    folder.mkdir()
    for i in range(args.images):
        shutil.copyfile(DIGITS[i % len(DIGITS)], folder / f"{i:06d}.png")
    ways = [("full", "2", "1"), ("full", "3", "1"), ("lite", "3", "1")]
    if args.monitoring:
        ways = [("full", "2", "1"), ("full", "2", "0")]
    seen: dict[tuple[str, str, str], list[dict[str, float]]] = {w: [] for w in ways}
    try:
        with RedisServer() as server:
            for _ in range(args.rounds):
                for kind, version, monitor in ways:
                    seen[(kind, version, monitor)].append(measure(
                        kind, version, server.url, folder, tmp, {"BATCHERY_MONITOR": monitor}
                    ))  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.images} files, {args.rounds} rounds alternated; cold start from `batchery "
          "worker` to the first answer; PSS of a pool process once serving")  # fmt: skip
    print(f"{'worker':<44} {'cold start s':>14} {'pool PSS MiB':>13} {'tree MiB':>9} "
          f"{'lone p50 ms':>13} {'bulk img/s':>17}")  # fmt: skip
    for (kind, version, monitor), runs in seen.items():
        name = f"{'TensorFlow' if kind == 'full' else 'lite'} worker, mnist-cnn@{version}"
        if args.monitoring:
            name += f", monitoring {'on' if monitor == '1' else 'off'}"

        def each(key: str, fmt: str, runs: list[dict[str, float]] = runs) -> str:
            return " / ".join(format(r[key], fmt) for r in runs)

        print(f"{name:<44} {each('cold_s', '.2f'):>14} {each('pool_pss_mib', '.0f'):>13} "
              f"{each('tree_pss_mib', '.0f'):>9} {each('lone_p50_ms', '.2f'):>13} "
              f"{each('img_s', ',.0f'):>17}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
