"""Several hosts on one machine: Linux network namespaces joined by veth pairs and a bridge.

Needs root and iproute2. Every namespace is named with this process's id, so runs don't
collide; :meth:`Hosts.close` kills every process left in them and deletes them, and runs
however the test ended (a context manager).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO

SUBNET = "10.251.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """Named hosts, each a namespace with one interface on a shared bridge (the switch)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.tag = f"bq{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.names = list(names)
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    def ns(self, name: str) -> str:
        """The namespace of host ``name``."""
        return f"{self.tag}-{name}"

    def port(self, name: str) -> str:
        """Host ``name``'s port on the switch (its cable)."""
        return f"p{self.names.index(name)}"

    def open(self) -> Hosts:
        """Make the switch and the hosts, each with its address and loopback up."""
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for name in self.names:
                ns = self._add(self.ns(name))
                port = self.port(name)
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", ns)  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, ns: str) -> str:
        _ip("netns", "add", ns)
        self._made.append(ns)
        return ns

    def run(
        self, name: str, command: Sequence[str], env: dict[str, str] | None = None,
        log: Path | None = None, stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``command`` on host ``name`` (``ip netns exec`` execs it: its pid is ours)."""
        out: int | IO[bytes] | None = stdout
        if log is not None:
            out = log.open("ab")
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *command], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if log is not None and out is not None and not isinstance(out, int):
            out.close()
        self.processes.append(process)
        return process

    def check(self, name: str, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on host ``name`` and wait for it."""
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *command],
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    def cut(self, name: str) -> None:
        """Pull host ``name``'s cable: its switch port goes down, packets are dropped both
        ways, and its TCP connections stay open on both ends, as after a real link loss."""
        _ip("-n", self.switch, "link", "set", self.port(name), "down")

    def restore(self, name: str) -> None:
        """Plug host ``name``'s cable back in."""
        _ip("-n", self.switch, "link", "set", self.port(name), "up")

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        for ns in self._made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Hosts:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
