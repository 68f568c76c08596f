"""The README's `make demo` runs `batchery demo`: it must work with nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from batchery.local import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def accuracy_of(output: str) -> float:
    match = re.search(r"^accuracy: ([\d.]+)%$", output, re.M)
    assert match, output
    return float(match.group(1))


def test_demo_starts_redis_and_a_worker_when_none_answers() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=400,
        env={**os.environ, "BATCHERY_REDIS_URL": dead},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started redis-server" in proc.stdout
    assert len(re.findall(r"^\d_\d\d\.png ", proc.stdout, re.M)) == 100
    assert accuracy_of(proc.stdout) >= 95.0
    assert "open http://127.0.0.1:8000" in proc.stdout  # the closing hint


def test_make_serve_runs_the_demo_then_serves_the_page_until_interrupted() -> None:
    """`make serve` (`batchery demo --serve`): a person opens the page and drops a digit."""
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchery.cli", "demo", "--serve", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "BATCHERY_REDIS_URL": dead}, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if f"open http://127.0.0.1:{port}" in line:
                break
        assert accuracy_of("".join(lines)) >= 95.0
        digit = ROOT / "examples" / "digits" / "7_03.png"
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/jobs",
                    params={"wait": 30},
                    content=digit.read_bytes(),
                    headers={"Content-Type": "image/png"},
                    timeout=60,
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the page did not come up"
                time.sleep(0.2)
        assert answer.status_code == 200
        assert answer.json()["jobs"][0]["result"]["label"] == "7"
        assert "Batchery" in httpx.get(f"http://127.0.0.1:{port}/").text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_demo_uses_the_workers_already_serving_redis(redis_server, worker) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "demo", "--no-worker"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "BATCHERY_REDIS_URL": redis_server.url},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "using redis://127.0.0.1" in proc.stdout
    assert accuracy_of(proc.stdout) >= 95.0
