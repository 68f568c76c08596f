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


REDIS_URL = re.compile(r"^redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/0$")


def test_services_share_one_redis_url_with_the_password() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "demo", "flower"} <= set(services)
    for name in ("worker", "demo"):
        env = services[name]["environment"]
        assert REDIS_URL.match(env["BATCHERY_REDIS_URL"]), name
        assert "redis" in services[name]["depends_on"]
    broker = [a for a in services["flower"]["command"] if a.startswith("--broker=")]
    assert broker and REDIS_URL.match(broker[0].removeprefix("--broker="))


def test_redis_is_durable_refuses_to_evict_and_wants_a_password() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--requirepass \$\{REDIS_PASSWORD:\?", command)
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD}"  # its healthcheck


def test_every_required_variable_is_in_the_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert required and required <= set(example), required - set(example)
    assert ".env" in (ROOT / ".gitignore").read_text().split()  # secrets stay out of git


def test_worker_health_shutdown_and_metrics() -> None:
    worker = compose()["services"]["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "batchery", "status", "--here"]
    assert worker["stop_signal"] == "SIGTERM"
    grace = worker["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= 30  # room to finish a batch
    port = worker["environment"]["BATCHERY_METRICS_PORT"]
    assert worker["expose"] == [port] and "ports" not in worker
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and str(sd["port"]) == port


def test_monitoring_and_demo_are_profiles() -> None:
    services = compose()["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert services["demo"]["profiles"] == ["demo"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in mounts
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/batchery.yml").read_text()
    )
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{dashboards_dir}" in mounts


def test_gpu_override_reserves_a_gpu_and_builds_tensorflow_with_cuda() -> None:
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["worker"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert "and-cuda" in gpu["build"]["args"]["TENSORFLOW"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ARG TENSORFLOW=""' in dockerfile and 'pip install "$TENSORFLOW"' in dockerfile


def test_demo_producer_is_one_shot() -> None:
    demo = compose()["services"]["demo"]
    assert demo["command"][:2] == ["demo", "--no-worker"]
    assert demo.get("restart", "no") == "no"


def test_services_run_commands_the_cli_accepts() -> None:
    """The image's entrypoint is `batchery`; each service's command must parse."""
    entrypoint = re.search(r"^ENTRYPOINT\s+(.*)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint and "batchery" in entrypoint.group(1)
    services = compose()["services"]
    commands = {name: services[name]["command"] for name in ("worker", "demo")}
    commands["healthcheck"] = services["worker"]["healthcheck"]["test"][2:]
    for name, command in commands.items():
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
