"""The README's `make demo` runs `batchery demo`: it must work with nothing running."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from producer.local import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def accuracy_of(output: str) -> float:
    match = re.search(r"^accuracy: ([\d.]+)%$", output, re.M)
    assert match, output
    return float(match.group(1))


def test_demo_starts_redis_and_a_worker_when_none_answers() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo"],
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


def test_demo_uses_the_workers_already_serving_redis(redis_server, worker) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "demo", "--no-worker"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "BATCHERY_REDIS_URL": redis_server.url},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "using redis://127.0.0.1" in proc.stdout
    assert accuracy_of(proc.stdout) >= 95.0
