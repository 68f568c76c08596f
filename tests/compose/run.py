#!/usr/bin/env python3
"""`make compose-test`: the compose stack on a real Docker engine, the documented commands.

Run as root (CI is). It installs what is missing (Debian's docker.io, docker-compose,
mmdebstrap, prometheus), starts a private dockerd when no engine answers (its own socket,
data root and exec root; stopped, unmounted and removed however the run ends), builds a
stand-in only for a base image it cannot pull (under the same name; see STAND_INS), builds
the project's Dockerfile unchanged, then runs every compose command that README.md,
docs/operations.md and the compose files' headers show, on a copy of the working tree with a
.env of fresh secrets:

  up -d; up -d --scale worker=3; the gateway's page and 1,000 digits through its port, every
  worker answering some; Flower behind its login; --profile monitoring (Prometheus up,
  scraping every worker and the gateway, its alert rules loaded; the gateway's model quality
  figures for those digits in it, no alert firing; each Grafana panel's query answered);
  run --rm demo; 2,000 jobs with a worker SIGKILLed mid-run, 0 lost; sh
  deploy/compose-scale.sh; run --rm models ... publish and list, then a job on the published
  model; the GPU override as `config` only (no GPU here); down -v, leaving no container,
  network or volume.

Grafana is not run: no registry is reachable here and it has no stand-in (its provisioning is
checked by tests/unit/test_compose.py, and its datasource's URL is checked to answer on the
compose network). Time budget: 8 minutes on a 2-core CI machine (BUDGET_S; measured 206 s,
installs included, 36 s of it the image's build; a whole-worker kill waits out the 60 s
visibility timeout); HARD_LIMIT_S stops a hung run. Standard library only: no venv needed.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 8 * 60
HARD_LIMIT_S = 15 * 60
PROJECT = "batchery"  # the copy's folder name: compose's default project name
WORKERS = 3  # the headers say 4; 3 fit a 2-core CI machine's memory and warm-up time
USER_UID = 1000  # the copy is owned by this uid, as a user's clone would be
# How long a killed worker's jobs wait to come back: Settings' default, which the compose file
# leaves as it is (read from the source: this script runs without the project's venv).
VISIBILITY_S = int(
    re.search(
        r"visibility_timeout_s: int = (\d+)", (ROOT / "producer" / "settings.py").read_text()
    ).group(1)  # type: ignore[union-attr]
)
# The restore's 1 s scan, its lock if the killed worker held it (10 s, worker/app.py), a
# batch's run, the queue ahead of it.
REDELIVERY_SLACK_S = 30
# The base images the compose file and the Dockerfile name, and how each is stood in for
# where it cannot be pulled. Grafana has none: it is left out of the run.
STAND_INS = {
    "python:3.11-slim": "python",
    "redis:7-alpine": "redis",
    "mher/flower:2.0": "flower",
    "prom/prometheus:v2.53.0": "prometheus",
}
NOT_RUN = {"grafana/grafana:11.1.0"}
STOOD_IN: list[str] = []  # what was built; removed again from an engine not the test's own
STAND_IN_LABEL = "org.batchery.stand-in"
DEBIAN_PACKAGES = ["python3", "python3-venv", "redis-server", "ca-certificates", "passwd"]

# Every compose command the docs show, and how this test runs it (None: exactly as shown).
# A documented command missing here fails the run before anything starts.
DOCUMENTED: dict[str, str | None] = {
    "docker compose up -d": None,
    "docker compose up -d --scale worker=4": f"docker compose up -d --scale worker={WORKERS}",
    "docker compose up --scale worker=N": f"docker compose up -d --scale worker={WORKERS}",
    "docker compose up -d --scale worker=N": f"docker compose up -d --scale worker={WORKERS}",
    "docker compose run --rm demo": None,
    # Without --scale, `up` returns the workers to one; grafana has no stand-in.
    "docker compose --profile monitoring up -d": (
        f"docker compose --profile monitoring up -d --scale worker={WORKERS} prometheus"
    ),
    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d": (
        "docker compose -f docker-compose.yml -f docker-compose.gpu.yml config (no GPU here)"
    ),
    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d --scale worker=1": (
        "docker compose -f docker-compose.yml -f docker-compose.gpu.yml config (no GPU here)"
    ),
    'docker compose run --rm --user "$(id -u):$(id -g)" models models publish '
    "/app/models-in/x.keras --name x --labels ...": "publish x.keras as x, labels 0-9",
    'docker compose run --rm --user "$(id -u):$(id -g)" models models publish '
    "/app/models-in/my.keras --name my --labels a,b": "publish x.keras as x, labels 0-9",
    # Run as shown, beside the TensorFlow workers (the lite phase).
    "docker compose --profile lite up -d --scale worker-lite=2": None,
}
DOC_FILES = ["README.md", "docs/operations.md", "docker-compose.yml", "docker-compose.gpu.yml"]


class Failed(Exception):
    pass


T0 = time.monotonic()
PHASES: list[tuple[str, float]] = []


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def check(condition: object, message: str) -> None:
    if not condition:
        raise Failed(message)


@contextmanager
def phase(name: str) -> Iterator[None]:
    start = time.monotonic()
    log(f"== {name}")
    try:
        yield
    finally:
        PHASES.append((name, time.monotonic() - start))


ENV = dict(os.environ)


def run(
    args: list[str] | str,
    *,
    cwd: Path | None = None,
    timeout: float = 300,
    quiet: bool = False,
    ok: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command (a string goes through sh, as a reader would type it)."""
    shown = args if isinstance(args, str) else " ".join(args)
    if not quiet:
        log(f"$ {shown}")
    proc = subprocess.run(
        args,
        shell=isinstance(args, str),
        cwd=cwd,
        env=ENV,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if ok and proc.returncode != 0:
        raise Failed(
            f"`{shown}` exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


# --- the documented commands ----------------------------------------------------------------


def documented_commands() -> set[str]:
    found = set()
    for name in DOC_FILES:
        text = (ROOT / name).read_text()
        if name.endswith(".yml"):  # the header's comment lines
            lines = [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]
        else:
            blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
            prose = re.sub(r"```.*?```", "", text, flags=re.S)
            lines = [line for block in blocks for line in block.splitlines()]
            lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
        for line in lines:
            start = line.find("docker compose")
            if start >= 0:
                command = " ".join(re.split(r"\s+#", line[start:])[0].split())
                if command != "docker compose":  # the tool's name in prose
                    found.add(command)
    return found


def check_documented_commands() -> None:
    missing = sorted(documented_commands() - set(DOCUMENTED))
    check(
        not missing,
        "the docs show compose commands this test does not run: add them to "
        f"DOCUMENTED in {Path(__file__).name}:\n  " + "\n  ".join(missing),
    )


# --- the machine: packages, ports, the engine -----------------------------------------------

_apt_updated = False


def apt_install(*packages: str) -> None:
    global _apt_updated
    check(os.geteuid() == 0, f"installing {' '.join(packages)} needs root (CI runs as root)")
    if not _apt_updated:
        run(["apt-get", "update", "-qq"], timeout=300)
        _apt_updated = True
    run(["apt-get", "install", "-y", "-qq", *packages], timeout=600)


def ensure_command(command: str, package: str) -> None:
    if shutil.which(command) is None:
        apt_install(package)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def check_ports() -> None:
    for port, who in ((5555, "flower"), (9090, "prometheus")):
        check(
            port_free(port),
            f"127.0.0.1:{port} is taken: the compose file publishes {who} "
            "there. Stop what listens on it and run again.",
        )
    check(
        any(port_free(p) for p in range(8000, 8010)),
        "127.0.0.1:8000-8009 are all taken: the compose file publishes the gateway on one of them.",
    )


def docker_answers() -> bool:
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0


class PrivateEngine:
    """A dockerd of its own: socket, data root, exec root and pid file under one folder."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="batchery-dockerd-", dir="/tmp"))
        self.sock = self.base / "docker.sock"
        self.log = self.base / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            "dockerd",
            f"--data-root={self.base}/data",
            f"--exec-root={self.base}/exec",
            f"--pidfile={self.base}/docker.pid",
            f"--host=unix://{self.sock}",
            # Leave the host's firewall and its docker0 alone: compose's own networks still
            # work, and published ports reach the host through docker-proxy.
            "--iptables=false",
            "--bridge=none",
            "--storage-driver=overlay2",
            "--containerd-namespace=batchery-compose-test",
            "--containerd-plugins-namespace=batchery-compose-test-plugins",
        ]
        log(f"$ {' '.join(args)}")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        ENV["DOCKER_HOST"] = f"unix://{self.sock}"
        deadline = time.monotonic() + 60
        while not (self.sock.exists() and docker_answers()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failed("the private dockerd did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # The containerd it started, if it outlived it.
        pidfile = self.base / "exec" / "containerd" / "containerd.pid"
        with suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        prefix = str(self.base) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        left = [m for m in Path("/proc/mounts").read_text().split() if m.startswith(prefix)]
        log(
            f"private dockerd stopped, {self.base} removed"
            + (f" (mounts left: {left})" if left else "")
        )


def install_compose_shim(work: Path) -> None:
    """`docker compose` as the docs write it. Without the CLI's compose plugin (Debian has
    none), a `docker` first on PATH hands `compose ...` to docker-compose 1.29."""
    if run(["docker", "compose", "version"], ok=False, quiet=True).returncode == 0:
        return
    ensure_command("docker-compose", "docker-compose")
    real = shutil.which("docker", path=ENV["PATH"])
    shim = work / "bin"
    shim.mkdir()
    (shim / "docker").write_text(
        f'#!/bin/sh\nif [ "$1" = compose ]; then shift; exec docker-compose "$@"; fi\n'
        f'exec {real} "$@"\n'
    )
    (shim / "docker").chmod(0o755)
    ENV["PATH"] = f"{shim}:{ENV['PATH']}"
    version = run(["docker-compose", "version", "--short"], quiet=True).stdout.strip()
    log(f"`docker compose` is docker-compose {version} here (a shim in {shim})")


# --- images ---------------------------------------------------------------------------------


def base_images() -> list[str]:
    compose = (ROOT / "docker-compose.yml").read_text()
    names = re.findall(r"^\s+image:\s*(\S+)", compose, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M | re.I))
    names += [n for n in re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
              if n not in stages and n != "scratch"]  # fmt: skip
    # The project's own images (batchery, batchery-lite, batchery-gateway): built, not pulled.
    return sorted({n for n in names if not re.match(r"batchery(-\w+)?:", n)} - NOT_RUN)


def image_present(name: str) -> bool:
    return run(["docker", "image", "inspect", name], ok=False, quiet=True).returncode == 0


def host_pip_conf() -> str:
    """pip's settings inside a stand-in: the host's CA bundle (TLS may be intercepted here),
    and the host's index-url if it sets one (file:// indexes don't travel)."""
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    index = os.environ.get("PIP_INDEX_URL")
    parser = configparser.ConfigParser()
    parser.read(
        [
            "/etc/pip.conf",
            "/etc/xdg/pip/pip.conf",
            Path.home() / ".pip/pip.conf",
            Path.home() / ".config/pip/pip.conf",
        ]
    )
    for section in ("global", "install"):
        index = index or parser.get(section, "index-url", fallback=None)
    if index and not index.startswith("file:"):
        lines.append(f"index-url = {index}")
    return "\n".join(lines) + "\n"


STAND_IN_FILES = {
    # Debian bookworm's python3 is 3.11. A venv at /usr/local puts python and pip where the
    # official image has them (and makes pip's installs land there too).
    "python": """FROM batchery-stand-in/bookworm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
RUN python3 -m venv /usr/local && python -c 'import sys; assert sys.version_info[:2] == (3, 11)'
CMD ["python3"]
""",
    "redis": """FROM batchery-stand-in/bookworm
WORKDIR /data
VOLUME /data
EXPOSE 6379
CMD ["redis-server"]
""",
    # mher/flower's own recipe: pip's flower and redis, run as `flower` in /data.
    "flower": """FROM python:3.11-slim
RUN pip install --no-cache-dir "flower==2.0.*" redis packaging \\
    && useradd --create-home flower && mkdir /data && chown flower /data
ENV PYTHONUNBUFFERED=1 FLOWER_DATA_DIR=/data PYTHONPATH=/data
WORKDIR /data
USER flower
EXPOSE 5555
CMD ["celery", "flower"]
""",
    # Debian's prometheus binary with the official image's entrypoint, user and paths.
    "prometheus": """FROM batchery-stand-in/bookworm
COPY prometheus /bin/prometheus
RUN mkdir -p /etc/prometheus /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
VOLUME /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
""",
}


def build_stand_in(name: str, kind: str, work: Path) -> None:
    if kind == "python" or kind == "redis" or kind == "prometheus":
        build_debian_base(work)
    if kind == "flower" and not image_present("python:3.11-slim"):
        build_stand_in("python:3.11-slim", "python", work)
    context = work / f"stand-in-{kind}"
    context.mkdir()
    (context / "Dockerfile").write_text(
        STAND_IN_FILES[kind] + f'LABEL {STAND_IN_LABEL}="{name} built by tests/compose/run.py"\n'
    )
    if kind == "python":
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", context)
        (context / "pip.conf").write_text(host_pip_conf())
    if kind == "prometheus":
        ensure_command("prometheus", "prometheus")
        shutil.copy(shutil.which("prometheus") or "", context / "prometheus")
    # The host's network for pip (the engine's own networks reach nothing outside).
    run(["docker", "build", "--quiet", "--network", "host", "-t", name, str(context)], timeout=300)
    STOOD_IN.append(name)
    log(f"{name}: stand-in built")


def build_debian_base(work: Path) -> None:
    if image_present("batchery-stand-in/bookworm"):
        return
    ensure_command("mmdebstrap", "mmdebstrap")
    tarball = work / "bookworm.tar"
    run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            "--include=" + ",".join(DEBIAN_PACKAGES),
            "bookworm",
            str(tarball),
        ],
        timeout=600,
    )
    run(
        [
            "docker",
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            "ENV LANG=C.UTF-8",
            str(tarball),
            "batchery-stand-in/bookworm",
        ],
        timeout=300,
    )
    STOOD_IN.append("batchery-stand-in/bookworm")
    tarball.unlink()


def provide_base_images(work: Path) -> dict[str, str]:
    how = {}
    unknown = [name for name in base_images() if name not in STAND_INS]
    check(not unknown, f"no stand-in recipe for {unknown}: add one to STAND_INS")
    # The python stand-in first: flower's is built on it.
    for name in sorted(base_images(), key=lambda n: STAND_INS[n] != "python"):
        if image_present(name):
            how[name] = "present"
        elif run(["docker", "pull", "--quiet", name], ok=False, timeout=600).returncode == 0:
            how[name] = "pulled"
        else:
            log(f"{name}: cannot be pulled here")
            build_stand_in(name, STAND_INS[name], work)
            how[name] = "stand-in"
    return how


# --- the stack ------------------------------------------------------------------------------


def copy_project(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored): no .venv in the
    build context, and the test's .env and models-in/ stay out of the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def write_env(project: Path) -> dict[str, str]:
    """.env.example with every change-me replaced by a fresh 64-hex-digit secret."""
    values = {}
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if value == "change-me":
                value = secrets.token_hex(32)
            values[key] = value
            line = f"{key}={value}"
        lines.append(line)
    (project / ".env").write_text("\n".join(lines) + "\n")
    return values


def compose(command: str, project: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run(command, cwd=project, **kwargs)


def containers(project: Path, service: str) -> list[str]:
    out = compose(f"docker compose ps -q {service}", project, quiet=True).stdout
    return out.split()


def inspect(container: str, template: str) -> str:
    return run(["docker", "inspect", "-f", template, container], quiet=True).stdout.strip()


def wait_for(what: str, probe: Any, timeout: float, every: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_healthy(project: Path, service: str, count: int, timeout: float) -> list[str]:
    def probe() -> list[str] | None:
        ids = containers(project, service)
        states = [inspect(c, "{{.State.Health.Status}}") for c in ids]
        return ids if len(ids) == count and all(s == "healthy" for s in states) else None

    ids = wait_for(f"{count} healthy {service}", probe, timeout)
    log(f"{count} {service} container(s) healthy")
    return ids


def ip_of(container: str) -> str:
    return inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")


class Http:
    def __init__(self, base: str) -> None:
        self.base = base

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 90,
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(
            self.base + path, data=body, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 90,
    ) -> tuple[int, Any]:
        status, raw = self.request(method, path, body, headers, timeout)
        return status, json.loads(raw)


DIGITS = sorted((ROOT / "examples" / "digits").glob("*.png"))


def multipart(files: list[Path]) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    parts = []
    for path in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{path.name}"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        parts.append(path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def submit(gateway: Http, files: list[Path], query: str = "") -> list[dict[str, Any]]:
    body, kind = multipart(files)
    status, answer = gateway.json("POST", "/v1/jobs" + query, body, {"Content-Type": kind})
    check(status in (200, 202), f"POST /v1/jobs{query}: {status} {answer}")
    return answer["jobs"]


def result(gateway: Http, job_id: str, wait: float = 60) -> dict[str, Any]:
    status, answer = gateway.json("GET", f"/v1/jobs/{job_id}?wait={wait}")
    check(status == 200, f"GET /v1/jobs/{job_id}: {status} {answer}")
    return answer


def promql(prometheus: Http, query: str) -> list[dict[str, Any]]:
    status, answer = prometheus.json("GET", "/api/v1/query?query=" + urllib.parse.quote(query))
    check(status == 200 and answer["status"] == "success", f"{query}: {status} {answer}")
    return answer["data"]["result"]


def jobs_by_instance(prometheus: Http) -> dict[str, float]:
    rows = promql(prometheus, "sum by (instance) (batchery_jobs_total)")
    return {row["metric"]["instance"]: float(row["value"][1]) for row in rows}


def stack(project: Path, secrets_: dict[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    with phase("up -d"):
        compose("docker compose up -d", project, timeout=300)
        [check_] = compose("docker compose ps -q secrets", project, quiet=True).stdout.split()
        check(inspect(check_, "{{.State.ExitCode}}") == "0", "the secrets check failed")
        logs = run(["docker", "logs", check_], quiet=True).stdout
        check("every one set, none an example" in logs, f"secrets check said: {logs}")
        [redis] = containers(project, "redis")
        check(
            inspect(redis, "{{json .NetworkSettings.Ports}}").count("HostPort") == 0,
            "the compose Redis publishes a host port",
        )
        check(len(containers(project, "worker")) == 1, "up -d: not one worker")

    with phase(f"up -d --scale worker={WORKERS}, until every worker is healthy"):
        compose(DOCUMENTED["docker compose up -d --scale worker=4"] or "", project, timeout=300)
        workers = wait_healthy(project, "worker", WORKERS, timeout=300)
        wait_healthy(project, "gateway", 1, timeout=120)
        port = compose("docker compose port gateway 8000", project, quiet=True).stdout.strip()
        check(port.startswith("127.0.0.1:"), f"the gateway published on {port}, not loopback")
        gateway = Http(f"http://{port}")
        status, page = gateway.request("GET", "/")  # `open http://127.0.0.1:8000`
        check(status == 200 and b"<html" in page.lower(), f"GET /: {status}")
        status, ready = gateway.json("GET", "/readyz")
        check(status == 200, f"/readyz: {status} {ready}")
        log(f"gateway on {port}: the page and /readyz {ready} answer")

    with phase("flower behind its login"):
        flower = Http("http://127.0.0.1:5555")
        check(flower.request("GET", "/api/workers")[0] == 401, "flower answers without a login")
        token = f"{secrets_['FLOWER_USER']}:{secrets_['FLOWER_PASSWORD']}".encode()
        login = {"Authorization": "Basic " + base64.b64encode(token).decode()}

        def flower_workers() -> list[str] | None:
            try:
                status, answer = flower.json("GET", "/api/workers?refresh=1", headers=login)
            except OSError:
                return None
            return list(answer) if status == 200 and len(answer) == WORKERS else None

        names = wait_for(f"flower to list {WORKERS} workers", flower_workers, 60, every=3)
        log(f"flower lists {sorted(names)}")

    with phase("--profile monitoring: prometheus scrapes every worker and the gateway"):
        command = DOCUMENTED["docker compose --profile monitoring up -d"] or ""
        compose(command, project, timeout=300)
        prometheus = Http("http://127.0.0.1:9090")
        want = {f"{ip_of(c)}:9100" for c in workers}
        # The gateways export the model quality figures (deploy/prometheus/prometheus.yml).
        want_gateways = {f"{ip_of(c)}:8000" for c in containers(project, "gateway")}

        def targets_up() -> bool:
            try:
                status, answer = prometheus.json("GET", "/api/v1/targets?state=active")
            except OSError:  # until it listens
                return False
            if status != 200:
                return False

            def up(job: str) -> set[str]:
                return {
                    t["labels"]["instance"]
                    for t in answer["data"]["activeTargets"]
                    if t["labels"]["job"] == job and t["health"] == "up"
                }

            return up("batchery-workers") == want and up("batchery-gateways") == want_gateways

        wait_for(f"prometheus to scrape exactly {sorted(want)} and the gateway "
                 f"{sorted(want_gateways)}", targets_up, 60)  # fmt: skip
        log(f"prometheus: every worker an up target {sorted(want)}, and the gateway "
            f"{sorted(want_gateways)}")  # fmt: skip
        # The model quality alerts (deploy/prometheus/alerts.yml, mounted beside the config),
        # each evaluated without error (health "unknown" until the first evaluation, 15 s).
        alert_names = ("BatcheryModelDrift", "BatcheryLowConfidence", "BatcheryLiveAccuracyLow")

        def alert_rules() -> dict[str, str]:
            status, answer = prometheus.json("GET", "/api/v1/rules?type=alert")
            check(status == 200, f"/api/v1/rules: {status} {answer}")
            return {r["name"]: r["health"] for g in answer["data"]["groups"] for r in g["rules"]}

        def rules_evaluated() -> bool:
            rules = alert_rules()
            check(set(rules) == set(alert_names), f"prometheus's alert rules: {rules}")
            return set(rules.values()) == {"ok"}

        wait_for("prometheus to evaluate the alert rules", rules_evaluated, 45)
        log(f"prometheus: the alert rules loaded and evaluated: {alert_rules()}")
        # Grafana's datasource URL (deploy/grafana/provisioning) answers on the network.
        compose(
            'docker compose exec -T gateway python -c "import urllib.request as u; '
            "u.urlopen('http://prometheus:9090/-/ready', timeout=5)\"",
            project,
        )

    with phase("1,000 digits through the gateway, every worker answering"):
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(lambda _: submit(gateway, DIGITS, "?wait=60"), range(10)))
        results = [job["result"] for jobs in answers for job in jobs if "result" in job]
        check(len(results) == 1000, f"{len(results)} of 1,000 answered within 60 s")
        check(all(r["status"] == "SUCCESS" for r in results), "a job did not succeed")
        right = sum(job["result"]["label"] == job["file"][0] for jobs in answers for job in jobs)
        log(f"1,000 answered, {right / 10:.1f}% right")
        check(right >= 950, f"accuracy {right / 10:.1f}%")

        def every_worker_answered() -> dict[str, float] | None:
            counts = jobs_by_instance(prometheus)
            done = set(counts) == want and all(counts.values()) and sum(counts.values()) >= 1000
            return counts if done else None

        counts = wait_for("every worker's jobs in prometheus", every_worker_answered, 30)
        log(f"jobs answered by each worker container (prometheus): {counts}")
        found["per_worker"] = counts
        scores = sum(float(r["value"][1]) for r in promql(prometheus, "batchery_top1_score_count"))
        check(scores >= 1000, f"the workers' top-1 score histogram holds {scores} jobs")

        # The gateway reads the model quality figures every 30 s; Prometheus scrapes them.
        promoted = (project / "models/mnist-cnn/PROMOTED").read_text().split()[0]
        version = f'{{job="batchery-gateways",model="mnist-cnn",version="{promoted}"}}'

        names = ("batchery_model_window_jobs", "batchery_model_drift", "batchery_model_drifted",
                 "batchery_model_low_confidence_ratio", "batchery_model_feedback_jobs")  # fmt: skip

        def quality() -> dict[str, float] | None:
            figures = {
                name: [float(r["value"][1]) for r in promql(prometheus, name + version)]
                for name in names
            }
            if not figures["batchery_model_window_jobs"] or not figures["batchery_model_drift"]:
                return None  # the first read with 1,000 jobs (the first live window) to come
            return {name: max(values) for name, values in figures.items() if values}

        figures = wait_for("the gateway's model quality figures in prometheus", quality, 90)
        log(f"mnist-cnn@{promoted} in prometheus, from the gateway: {figures}")
        # The same digits as the first window, which is the baseline: no drift; the shipped
        # model answers these digits confidently (no alert would fire).
        check(figures["batchery_model_window_jobs"] >= 1000, f"window: {figures}")
        check(figures["batchery_model_drifted"] == 0, f"drifted on the same digits: {figures}")
        check(figures["batchery_model_low_confidence_ratio"] < 0.1, f"low: {figures}")

    with phase("run --rm demo"):
        out = compose("docker compose run --rm demo", project, timeout=300).stdout
        [line] = re.findall(r"^accuracy: .*$", out, re.M) or [""]
        readme = re.search(r"a line `(accuracy: [0-9.]+%)`", (ROOT / "README.md").read_text())
        check(
            readme and line == readme.group(1),
            f"demo printed {line!r}, the README says {readme and readme.group(1)!r}",
        )
        check(len(containers(project, "worker")) == WORKERS, "run --rm demo changed the workers")
        log(f"demo: {line}")

    with phase("2,000 jobs, one worker SIGKILLed mid-run: none lost"):
        # Twenty requests of 100 from a thread; the kill lands as soon as the first answers
        # come, with most jobs still to submit, queued, buffered or running.
        ids: list[str] = []

        def push() -> None:
            for _ in range(20):
                ids.extend(job["job_id"] for job in submit(gateway, DIGITS))

        def first_answers() -> bool:
            sample = ids[:100:10]
            return bool(sample) and any(
                result(gateway, j, 0)["status"] != "PENDING" for j in sample
            )

        victim = workers[1]

        def pending(sample: list[str]) -> int:
            with ThreadPoolExecutor(16) as pool:
                answers = pool.map(lambda j: result(gateway, j, 0)["status"], sample)
                return sum(status == "PENDING" for status in answers)

        with ThreadPoolExecutor(1) as pool:
            pushing = pool.submit(push)
            wait_for("the first answers", first_answers, 60, every=0.02)
            run(["docker", "kill", "-s", "KILL", victim], quiet=True)
            killed = time.monotonic()
            sample = list(ids)[::10]
            at_kill = (len(ids), len(sample), pending(sample))
            pushing.result()
        log(
            f"SIGKILLed {victim[:12]} with {at_kill[0]} jobs submitted; just after, {at_kill[2]} "
            f"of {at_kill[1]} sampled ones were not answered yet"
        )
        check(at_kill[0] < 2000 or at_kill[2] > 0, "every job was answered before the kill")
        # What the killed worker held comes back once its delivery is VISIBILITY_S old (the
        # restore runs every second); one wait of the gateway's longest (60 s) begun after the
        # kill can end just before that, so each job is asked again until the bound passes.
        bound = killed + VISIBILITY_S + REDELIVERY_SLACK_S

        def answered(job_id: str) -> dict[str, Any]:
            while True:
                left = bound - time.monotonic()
                answer = result(gateway, job_id, max(0.0, min(60.0, left)))
                if answer["status"] != "PENDING" or left <= 0:
                    return answer

        with ThreadPoolExecutor(16) as pool:
            final = list(pool.map(answered, ids))
        recovered = time.monotonic() - killed
        statuses = Counter(r["status"] for r in final)
        lost = 2000 - statuses["SUCCESS"]
        restarts = inspect(victim, "{{.RestartCount}}")
        log(
            f"after: {dict(statuses)} of {len(set(ids))} jobs, {lost} lost; the last answered "
            f"{recovered:.1f} s after the kill (what the killed worker held comes back after "
            f"BATCHERY_VISIBILITY_TIMEOUT, {VISIBILITY_S} s); the killed container restarted "
            f"{restarts} times"
        )
        check(
            len(set(ids)) == 2000 and lost == 0,
            f"{lost} of 2,000 jobs not SUCCESS {VISIBILITY_S + REDELIVERY_SLACK_S} s after the "
            f"kill (the visibility timeout and {REDELIVERY_SLACK_S} s): {dict(statuses)} of "
            f"{len(set(ids))} jobs",
        )
        found["kill"] = (*at_kill, recovered)

    with phase("every Grafana panel's query answers in prometheus"):
        dashboard = json.loads((ROOT / "deploy/grafana/dashboards/batchery.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        empty = [e for e in exprs if not promql(prometheus, e)]
        check(exprs and not empty, f"panels with no data: {empty}")
        log(f"{len(exprs)} panel queries, each with data")
        alerts = promql(prometheus, 'ALERTS{alertname=~"Batchery.*"}')
        check(not alerts, f"model quality alerts on a healthy stack: {alerts}")

    with phase("sh deploy/compose-scale.sh"):
        out = compose("sh deploy/compose-scale.sh", project, timeout=180).stdout
        check("backlog 0 jobs, threshold 2000 a worker: 1 workers" in out, out)
        check(len(containers(project, "worker")) == 1, "compose-scale.sh left not one worker")

    with phase("run --rm models: publish, list, a job on the published model"):
        # The copy is owned by USER_UID, as a clone is by its user: `$(id -u):$(id -g)` is
        # what that user's shell would put there.
        inbox = project / "models-in"
        inbox.mkdir()
        promoted = (project / "models/mnist-cnn/PROMOTED").read_text().strip()
        shutil.copy(project / f"models/mnist-cnn/{promoted}/model.keras", inbox / "x.keras")
        os.chown(inbox, USER_UID, USER_UID)
        os.chown(inbox / "x.keras", USER_UID, USER_UID)
        labels = ",".join(str(i) for i in range(10))
        compose(
            f'docker compose run --rm --user "{USER_UID}:{USER_UID}" models models publish '
            f"/app/models-in/x.keras --name x --labels {labels}",
            project,
        )
        listed = compose("docker compose run --rm models", project).stdout
        check(re.search(r"^x\s+1 \*", listed, re.M), f"models list:\n{listed}")
        [job] = submit(gateway, [DIGITS[70]], "?wait=60&model=x")
        check(
            job["result"]["status"] == "SUCCESS" and job["result"]["model"] == "x",
            f"a job on x: {job}",
        )
        log(f"published x@1; a job on it: {job['result']['label']} ({DIGITS[70].name})")

    with phase("--profile lite: lite workers (no TensorFlow) beside the TensorFlow ones"):
        began = time.monotonic()
        compose("docker compose --profile lite up -d --scale worker-lite=2", project, timeout=300)
        lite = containers(project, "worker-lite")
        check(len(lite) == 2, f"{len(lite)} lite worker containers, not 2")
        for container in lite:
            out = run(["docker", "exec", container, "python", "-c",
                       "import importlib.util as u; print(u.find_spec('tensorflow'))"],
                      quiet=True).stdout.strip()  # fmt: skip
            check(out == "None", f"TensorFlow is importable in the lite image: {out}")

        def lite_alive() -> bool:
            # A heartbeat a pool process: two containers of BATCHERY_CONCURRENCY=2 make four.
            status, rows = gateway.json("GET", "/v1/models")
            return status == 200 and any(r["version"] == "3" and r["workers"]["lite"] >= 4
                                         for r in rows)  # fmt: skip

        wait_for("two lite workers alive (GET /v1/models)", lite_alive, 180, every=0.2)
        found["lite_up_s"] = round(time.monotonic() - began, 1)
        log(f"two lite worker containers up and serving {found['lite_up_s']} s after `up`")
        # LiteRT jobs (mnist-cnn@3) reach every kind; the promoted Keras version never a
        # lite worker.
        answers = [submit(gateway, DIGITS, "?wait=60&version=3") for _ in range(4)]
        answers += [submit(gateway, DIGITS, "?wait=60") for _ in range(2)]
        results = [job["result"] for jobs in answers for job in jobs if "result" in job]
        check(len(results) == 600 and all(r["status"] == "SUCCESS" for r in results),
              f"{len(results)} of 600 answered")  # fmt: skip
        served = {"3": 0, promoted: 0}
        for r in results:
            served[r["version"]] = served.get(r["version"], 0) + 1
        check(served == {"3": 400, promoted: 200}, f"versions answered: {served}")
        by_lite = 0
        for container in lite:
            logs = run(["docker", "logs", container], quiet=True)
            text = logs.stdout + logs.stderr  # a worker logs to stderr
            check(f"mnist-cnn@{promoted}" not in re.sub(r"loaded .*", "", text),
                  f"a Keras job ran on a lite worker:\n{text[-2000:]}")  # fmt: skip
            by_lite += sum(int(n) for n in re.findall(r"batch of (\d+) jobs \(mnist-cnn@3", text))
        check(by_lite > 0, "no LiteRT job was answered by a lite worker")
        log(f"lite workers answered {by_lite} of 400 LiteRT jobs; {served}")
        found["lite_answered"] = by_lite
    return found


def check_gpu_override(project: Path) -> None:
    out = compose(
        "docker compose -f docker-compose.yml -f docker-compose.gpu.yml config", project
    ).stdout
    for needed in (
        "driver: nvidia",
        "- gpu",
        "TENSORFLOW: tensorflow[and-cuda]",
        "image: batchery:gpu",
        "BATCHERY_CONCURRENCY: '1'",
    ):
        check(needed in out, f"the GPU override's config lacks {needed!r}")


def left_over(project_name: str) -> list[str]:
    label = f"label=com.docker.compose.project={project_name}"
    left = []
    for kind in ("container ls -a", "network ls", "volume ls"):
        ids = run(["docker", *kind.split(), "-q", "--filter", label], quiet=True).stdout.split()
        left += [f"{kind.split()[0]} {i}" for i in ids]
    return left


def save_logs(project: Path) -> None:
    """Every service's log into $COMPOSE_TEST_LOGS, when set (CI keeps it)."""
    if os.environ.get("COMPOSE_TEST_LOGS"):
        out = compose("docker compose logs --no-color", project, quiet=True, ok=False)
        Path(os.environ["COMPOSE_TEST_LOGS"]).write_text(out.stdout + out.stderr)
        log(f"the services' logs are in {os.environ['COMPOSE_TEST_LOGS']}")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def too_long(*_: object) -> None:
        raise Failed(f"over the hard limit of {HARD_LIMIT_S} s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(HARD_LIMIT_S)
    engine: PrivateEngine | None = None
    work = Path(tempfile.mkdtemp(prefix="batchery-compose-"))
    project = work / PROJECT
    up = False
    failure = ""
    had_6379 = listening(6379)
    ENV.pop("COMPOSE_PROJECT_NAME", None)
    ENV.pop("COMPOSE_FILE", None)
    ENV.pop("COMPOSE_PROFILES", None)
    ENV["DOCKER_BUILDKIT"] = "0"  # the classic builder: no buildx plugin needed
    try:
        with phase("preflight: documented commands, ports, packages, engine"):
            check_documented_commands()
            check_ports()
            ensure_command("docker", "docker.io")
            if docker_answers():
                log("a Docker engine answers: using it")
            else:
                ensure_command("dockerd", "docker.io")
                check(os.geteuid() == 0, "starting a private dockerd needs root")
                engine = PrivateEngine()
                engine.start()
                log(f"private dockerd on {engine.sock}")
            install_compose_shim(work)
        with phase("base images: pulled, or stood in for"):
            how = provide_base_images(work)
            log(f"base images: {how}")
        with phase("the project's copy, .env, config, the GPU override"):
            project.mkdir()
            copy_project(project)
            values = write_env(project)
            run(["chown", "-R", f"{USER_UID}:{USER_UID}", str(project)], quiet=True)
            compose("docker compose config -q", project)
            check_gpu_override(project)
        with phase("build: the project's Dockerfile, unchanged"):
            # Compose builds it, on the host's network (the engine's reach nothing outside).
            override = work / "build-on-host-network.yml"
            override.write_text(
                "services:\n"
                + "".join(
                    f"  {s}:\n    build:\n      network: host\n"
                    for s in ("worker", "gateway", "worker-lite")
                )
            )
            up = True
            compose(
                f"docker compose -f docker-compose.yml -f {override} --profile lite "
                "build worker gateway worker-lite",
                project,
                timeout=600,
            )
        found = stack(project, values)
        save_logs(project)
        with phase("down -v"):
            compose("docker compose down -v", project, timeout=180)
            up = False
            left = left_over(PROJECT)
            check(not left, f"down -v left {left}")
            check(listening(6379) == had_6379, "the host's port 6379 changed")
            log("down -v: no container, network or volume left")
    except Exception as exc:
        if not isinstance(exc, Failed):
            traceback.print_exc()
        log(f"FAILED: {exc}")
        failure = f"compose-test: FAILED: {exc}"
        if up:
            save_logs(project)
        if up:
            with suppress(Exception):
                out = compose("docker compose logs --tail 40", project, quiet=True, ok=False)
                print(out.stdout[-8000:], out.stderr[-2000:])
        return 1
    finally:
        signal.alarm(0)
        if up:
            with suppress(Exception):
                compose(
                    "docker compose --profile monitoring --profile demo --profile admin "
                    "--profile lite down -v --remove-orphans",
                    project,
                    timeout=180,
                    ok=False,
                )
        if engine is not None:
            engine.stop()
        elif STOOD_IN:  # someone's engine: no stand-in stays behind under a real name
            run(["docker", "rmi", *reversed(STOOD_IN)], ok=False)
        shutil.rmtree(work, ignore_errors=True)
        total = time.monotonic() - T0
        print("\nphases:")
        for name, seconds in PHASES:
            print(f"  {seconds:6.1f} s  {name}")
        print(f"  {total:6.1f} s  total (budget {BUDGET_S} s)")
        if failure:  # again, last: a CI log shows its tail, after the stack's logs
            print(failure, flush=True)
    total = time.monotonic() - T0
    kill = found["kill"]
    print(
        f"compose-test: passed in {total:.0f} s. 1,000 digits answered by {WORKERS} workers "
        f"({sorted(found['per_worker'].values())}); 2,000 jobs, a worker SIGKILLed with "
        f"{kill[0]} submitted and {kill[2]} of {kill[1]} sampled unanswered: 0 lost, the last "
        f"answered {kill[3]:.0f} s after the kill"
    )
    if total > BUDGET_S:
        print(f"compose-test: over its budget of {BUDGET_S} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
