"""The compose file and the image can't run here (no Docker engine): check what can be checked."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_worker_can_scale() -> None:
    worker = compose()["services"]["worker"]
    # `docker compose up --scale worker=N` fails with a container_name or a fixed host port.
    assert "container_name" not in worker
    for port in worker.get("ports", []):
        assert ":" not in str(port), f"fixed host port {port} blocks --scale"


def test_services_share_one_redis_url() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "demo"} <= set(services)
    for name in ("worker", "demo"):
        env = services[name]["environment"]
        assert env["BATCHERY_REDIS_URL"].startswith("redis://redis:6379"), name
        assert "redis" in services[name]["depends_on"]


def test_demo_producer_is_one_shot() -> None:
    demo = compose()["services"]["demo"]
    assert demo["command"][:2] == ["demo", "--no-worker"]
    assert demo.get("restart", "no") == "no"


def test_services_run_commands_the_cli_accepts() -> None:
    """The image's entrypoint is `batchery`; each service's command must parse."""
    entrypoint = re.search(r"^ENTRYPOINT\s+(.*)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and "batchery" in entrypoint.group(1)
    for name in ("worker", "demo"):
        command = compose()["services"][name]["command"]
        proc = subprocess.run(
            [sys.executable, "-m", "producer.cli", command[0], "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        for flag in (c for c in command if c.startswith("--")):
            assert flag.split("=")[0] in proc.stdout, (name, flag)


def test_image_installs_the_worker_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*\.\[worker[],]", dockerfile)
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.M)


def test_workers_share_the_model_registry() -> None:
    worker = compose()["services"]["worker"]
    assert "./models:/app/models" in worker["volumes"]
    assert "ENV BATCHERY_MODEL_DIR=/app/models" in (ROOT / "Dockerfile").read_text()
