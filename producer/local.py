"""Processes Batchery starts on this machine for a demo or a test: a redis-server, a worker.

No TensorFlow here: the worker is a separate ``batchery worker`` process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from producer.errors import BatcheryError, RedisUnavailableError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout: float = 1.0, **options: Any) -> bool:
    """True if a Redis server answers PING at ``url`` (``options``: e.g. TLS files)."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout, **options
    )
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return False
    finally:
        client.close()


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on a free port; a context manager that stops it."""

    port: int = field(default_factory=free_port)
    args: tuple[str, ...] = ()
    workdir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    #: How to reach it once it is up, when ``url`` can't (a password, TLS): URL and options.
    ready_url: str | None = None
    ready_options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisUnavailableError(
                "redis-server is not installed: install it (e.g. apt-get install redis-server) "
                "or run the stack with docker compose"
            )
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="batchery-redis-"))
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            *self.args,
        ]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.ready_url or self.url, 0.2, **self.ready_options):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailableError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        terminate(self.process, 10.0)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess:
    """A ``batchery serve`` subprocess on a free port; a context manager that stops it."""

    def __init__(self, redis_url: str, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, log_path: Path | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.args = args
        self.env = {**os.environ, **(env or {}), "BATCHERY_REDIS_URL": redis_url}
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix="batchery-gateway-", suffix=".log")[1]
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        """Start it and wait until ``/healthz`` answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "serve", "--port", str(self.port),
                 *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _answers(f"{self.url}/healthz"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise BatcheryError(f"the gateway did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        terminate(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM a child process; SIGKILL it if it has not exited within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


class WorkerProcess:
    """A ``batchery worker`` subprocess; a context manager that stops it and its children."""

    def __init__(
        self,
        redis_url: str,
        *args: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.args = args
        self.env = {**os.environ, **(env or {}), "BATCHERY_REDIS_URL": redis_url}
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix="batchery-worker-", suffix=".log")[1]
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker in its own process group."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "producer.cli", "worker", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the whole group if it does not finish in time."""
        if self.process is None or self.process.poll() is not None:
            return
        terminate(self.process, timeout)
        # Pool processes orphaned by a main process that did not finish cleanly.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def check_alive(self) -> None:
        """Raise with the worker's log tail if it has exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise BatcheryError(f"worker exited with code {self.process.returncode}:\n{tail}")

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
