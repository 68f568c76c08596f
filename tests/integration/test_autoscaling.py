"""Scaling by the backlog without Kubernetes: deploy/compose-scale.sh, KEDA's rule for compose.

The script reads ``batchery status --json`` in a worker container and runs ``docker compose up
--scale worker=N``. No Docker engine runs here, so ``docker`` is a stand-in on PATH that runs
the ``exec``'d command on this machine (a real ``batchery status`` against a real Redis holding
a real backlog) and records every other call.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchery.local import RedisServer
from producer.client import Client
from tests.factories import digit_paths

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "compose-scale.sh"
FAKE_DOCKER = """#!/bin/sh
if [ "$1 $2 $3 $4" = "compose exec -T worker" ]; then shift 4; exec "$@"; fi
echo "$@" >> "$DOCKER_CALLS"
"""


def scale(server: RedisServer, tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    done = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          check=True, cwd=ROOT,
                          env={**os.environ, "PATH": path, "DOCKER_CALLS": str(calls),
                               "BATCHERY_REDIS_URL": server.url, **env})  # fmt: skip
    return done.stdout, calls.read_text().splitlines()


def test_compose_workers_follow_the_backlog_by_kedas_rule(tmp_path: Path) -> None:
    with RedisServer() as server, Client(server.url) as client:
        out, calls = scale(server, tmp_path)
        assert "backlog 0 jobs" in out and calls == ["compose up -d --no-recreate --scale "
                                                     "worker=1 worker"]  # fmt: skip
        paths = digit_paths()
        client.submit_many([paths[i % len(paths)] for i in range(4500)])  # 18 messages
        out, calls = scale(server, tmp_path)
        assert "backlog 4500 jobs, threshold 2000 a worker: 3 workers" in out
        assert calls == ["compose up -d --no-recreate --scale worker=3 worker"]
        assert scale(server, tmp_path, MAX="2")[1][-1].endswith("worker=2 worker")
        assert scale(server, tmp_path, THRESHOLD="100")[1][-1].endswith("worker=40 worker")
        out, calls = scale(server, tmp_path, DRY_RUN="1")
        assert "3 workers" in out and calls == []
