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

from producer.connections import pings
from producer.errors import BatcheryError, RedisUnavailableError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(url: str, timeout: float = 1.0, **options: Any) -> bool:
    """True if a Redis server answers PING at ``url`` (``options``: e.g. TLS files)."""
    # Not connections.client: a throwaway server's URL and options, not a deployment's settings.
    return pings(redis.Redis.from_url(url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout, **options))  # fmt: skip


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
        # Its own session, as the worker's: a Ctrl-C in the terminal reaches the command that
        # started it, which stops it in turn (after the worker that needs it).
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
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
                [sys.executable, "-m", "batchery.cli", "serve", "--port", str(self.port),
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
        module: str = "batchery.cli",
    ) -> None:
        self.redis_url = redis_url
        self.args = args
        self.module = module  # the command's module (an older checkout's: producer.cli)
        self.env = {**os.environ, **(env or {}), "BATCHERY_REDIS_URL": redis_url}
        self.log_path = log_path or Path(
            tempfile.mkstemp(prefix="batchery-worker-", suffix=".log")[1]
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the worker in its own process group."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "worker", *self.args],
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


@dataclass
class SentinelSet:
    """A Redis that fails over, on 127.0.0.1: a primary, replicas and sentinels watching it.

    For tests and the bench. ``password`` guards Redis (primary and replicas), as the ACL user
    ``username`` if given (the default user then off); ``sentinel_password`` the sentinels.
    ``tls``: (CA, certificate, key) files; then every server and sentinel talks TLS only, to
    each other too, and requires client certificates. A context manager that stops every
    process.
    """

    replicas: int = 2
    sentinels: int = 3
    master: str = "batchery"
    password: str | None = None
    sentinel_password: str | None = None
    username: str | None = None
    tls: tuple[Path, Path, Path] | None = None
    down_after_ms: int = 1000
    servers: list[RedisServer] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinel_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def url(self) -> str:
        """``sentinel://[user:password@]127.0.0.1:<port>/0;...``: BATCHERY_REDIS_URL's form."""
        login = f"{self.username or ''}:{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{login}127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        """The BATCHERY_* variables that reach this Redis through its sentinels."""
        env = {"BATCHERY_REDIS_URL": self.url, "BATCHERY_SENTINEL_MASTER": self.master}
        if self.sentinel_password:
            env["BATCHERY_SENTINEL_PASSWORD"] = self.sentinel_password
        if self.tls:
            ca, cert, key = self.tls
            env.update(BATCHERY_SENTINEL_TLS="1", BATCHERY_REDIS_TLS_CA=str(ca),
                       BATCHERY_REDIS_TLS_CERT=str(cert),
                       BATCHERY_REDIS_TLS_KEY=str(key))  # fmt: skip
        return env

    def _tls_options(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        ca, cert, key = self.tls
        return {"ssl": True, "ssl_ca_certs": str(ca), "ssl_certfile": str(cert),
                "ssl_keyfile": str(key)}  # fmt: skip

    def _tls_lines(self, port: int) -> list[str]:
        """How a server or sentinel listens: plainly on ``port``, or (with ``tls``) TLS only
        there, client certificates required, and TLS to the servers it connects to."""
        if not self.tls:
            return [f"port {port}"]
        ca, cert, key = self.tls
        return ["port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                f"tls-ca-cert-file {ca}", "tls-auth-clients yes",
                "tls-replication yes"]  # fmt: skip

    def start(self, timeout: float = 30.0) -> SentinelSet:
        """Start the primary, its replicas, then the sentinels; wait until the sentinels
        know every replica and each other."""
        self.workdir = self.workdir or Path(tempfile.mkdtemp(prefix="batchery-sentinel-"))
        auth: tuple[str, ...] = ()
        if self.password and self.username:
            # One word an argument: redis-server quotes an argument holding a space.
            auth = ("--user", "default", "off", "--user", self.username, "on",
                    f">{self.password}", "~*", "&*", "+@all",
                    "--masteruser", self.username, "--masterauth", self.password)  # fmt: skip
        elif self.password:
            auth = ("--requirepass", self.password, "--masterauth", self.password)
        # The rediss:// URL says TLS; the options give the files.
        ready: dict[str, Any] = {k: v for k, v in self._tls_options().items() if k != "ssl"}
        if self.password:
            ready.update(password=self.password, username=self.username)

        def server(*args: str) -> RedisServer:
            port = free_port()
            settings = [word for line in self._tls_lines(port)
                        for word in (f"--{line.split()[0]}", line.split()[1])]  # fmt: skip
            scheme = "rediss" if self.tls else "redis"
            return RedisServer(port=port, args=(*settings, *auth, *args),
                               ready_url=f"{scheme}://127.0.0.1:{port}/0",
                               ready_options=ready).start()  # fmt: skip

        try:
            primary = server()
            self.servers.append(primary)
            for _ in range(self.replicas):
                self.servers.append(server("--replicaof", "127.0.0.1", str(primary.port)))
            for i in range(self.sentinels):
                self._start_sentinel(i, primary.port)
            self._wait_until_known(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self, index: int, primary_port: int) -> None:
        port = free_port()
        lines = [
            *self._tls_lines(port),
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"sentinel monitor {self.master} 127.0.0.1 {primary_port} {self.sentinels // 2 + 1}",
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master} 10000",
            f"sentinel parallel-syncs {self.master} {max(1, self.replicas)}",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.master} {self.password}")
        if self.username:
            lines.append(f"sentinel auth-user {self.master} {self.username}")
        if self.sentinel_password:
            lines += [f"requirepass {self.sentinel_password}",
                      f"sentinel sentinel-pass {self.sentinel_password}"]  # fmt: skip
        assert self.workdir is not None
        config = self.workdir / f"sentinel-{index}.conf"  # sentinels rewrite their config
        config.write_text("\n".join(lines) + "\n")
        binary = shutil.which("redis-server") or "redis-server"
        log = (self.workdir / f"sentinel-{index}.log").open("ab")
        command = [binary, str(config), "--sentinel"]
        self.sentinel_processes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        )
        log.close()
        self.sentinel_ports.append(port)

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        """A client of one sentinel (for SENTINEL commands)."""
        return redis.Redis(port=self.sentinel_ports[index], password=self.sentinel_password,
                           socket_timeout=2, decode_responses=True,
                           **self._tls_options())  # fmt: skip

    def primary_port(self) -> int:
        """The port of the server the sentinels name as the primary now."""
        for index in range(len(self.sentinel_ports)):
            with contextlib.suppress(redis.RedisError):
                address: Any = self.sentinel_client(index).sentinel_get_master_addr_by_name(
                    self.master
                )
                return int(address[1])
        raise RedisUnavailableError("no sentinel answers")

    def server(self, port: int) -> RedisServer:
        """The server on ``port``."""
        return next(server for server in self.servers if server.port == port)

    def _wait_until_known(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(_in_sync(server) for server in self.servers[1:]):
            if time.monotonic() > deadline:
                raise RedisUnavailableError(f"the replicas did not sync within {timeout:g} s")
            time.sleep(0.1)
        while True:
            known = 0
            for index in range(len(self.sentinel_ports)):
                with contextlib.suppress(redis.RedisError):
                    state: Any = self.sentinel_client(index).sentinel_master(self.master)
                    replicas, others = int(state["num-slaves"]), int(state["num-other-sentinels"])
                    known += replicas >= self.replicas and others >= self.sentinels - 1
            if known == self.sentinels:
                return
            if time.monotonic() > deadline:
                raise RedisUnavailableError(f"the sentinels did not all see each other and "
                                            f"the replicas within {timeout:g} s")  # fmt: skip
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the sentinels first (so they don't fail over on the way down), then Redis."""
        for process in self.sentinel_processes:
            terminate(process, 10.0)
        for server in self.servers:
            server.stop()

    def __enter__(self) -> SentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _in_sync(server: RedisServer) -> bool:
    """Whether a replica's link to its primary is up (its first full sync done)."""
    client = redis.Redis.from_url(server.ready_url or server.url, socket_timeout=2,
                                  decode_responses=True, **server.ready_options)  # fmt: skip
    try:
        return client.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False
    finally:
        client.close()
