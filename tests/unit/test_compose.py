"""The compose files and the image by their structure (tests/compose/run.py runs them)."""

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


REDIS_URL = re.compile(r"^redis://batchery:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/0$")


def test_services_share_one_redis_url_as_the_restricted_user() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "demo", "flower"} <= set(services)
    for name in ("worker", "demo"):
        env = services[name]["environment"]
        assert REDIS_URL.match(env["BATCHERY_REDIS_URL"]), name
        assert "redis" in services[name]["depends_on"]
    assert REDIS_URL.match(services["flower"]["environment"]["CELERY_BROKER_URL"])


def test_no_secret_is_on_a_command_line() -> None:
    """`ps` inside a container shows its command: secrets travel in the environment."""
    for name, service in compose()["services"].items():
        command = " ".join(service.get("command", []) if name != "redis" else [])
        assert "PASSWORD" not in command and "AUTH" not in command, name
    flower = compose()["services"]["flower"]
    assert "FLOWER_PASSWORD" in flower["environment"]["FLOWER_BASIC_AUTH"]


def test_redis_is_durable_refuses_to_evict_and_runs_the_restricted_user() -> None:
    redis = compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    # The ACL the security docs recommend (and tests/integration/test_locked_down.py runs).
    assert "--user default off" in command
    assert re.search(
        r"--user batchery on >\$\{REDIS_PASSWORD:\?[^}]*\} ~\* &\* \+@all -@dangerous", command
    )
    assert "requirepass" not in command
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD}"  # its healthcheck
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "--user", "batchery", "ping"]


def test_dashboards_publish_on_localhost_unless_told_otherwise() -> None:
    services = compose()["services"]
    for name in ("flower", "prometheus", "grafana"):
        [port] = services[name]["ports"]
        assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), name
    assert "ports" not in services["redis"] and "ports" not in services["worker"]


def test_nothing_starts_before_the_secrets_are_checked() -> None:
    services = compose()["services"]
    check = services["secrets"]
    assert check["entrypoint"] == ["sh", "/check-secrets.sh"]
    assert "./deploy/check-secrets.sh:/check-secrets.sh:ro" in check["volumes"]
    for name in ("redis", "grafana"):
        assert services[name]["depends_on"]["secrets"] == {
            "condition": "service_completed_successfully"
        }, name


def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ROOT / "deploy" / "check-secrets.sh")], env=env,
                          capture_output=True, text=True)  # fmt: skip


def test_the_secrets_check_refuses_the_examples_and_short_ones() -> None:
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    refused = run_check(**example)
    assert refused.returncode == 1
    assert refused.stderr.count("example's placeholder") == 3
    assert "openssl rand -hex 32" in refused.stderr
    strong = "0123456789abcdef0123456789abcdef"
    short = run_check(REDIS_PASSWORD="tooshort", FLOWER_PASSWORD=strong,
                      GRAFANA_ADMIN_PASSWORD=strong)  # fmt: skip
    assert short.returncode == 1 and "REDIS_PASSWORD is 8 characters" in short.stderr
    unset = run_check(FLOWER_PASSWORD=strong, GRAFANA_ADMIN_PASSWORD=strong)
    assert unset.returncode == 1 and "REDIS_PASSWORD is not set" in unset.stderr
    good = run_check(REDIS_PASSWORD=strong, FLOWER_PASSWORD=strong + "x",
                     GRAFANA_ADMIN_PASSWORD=strong + "y")  # fmt: skip
    assert good.returncode == 0, good.stderr


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
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == {"batchery-workers", "batchery-gateways"}
    [sd] = jobs["batchery-workers"]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and str(sd["port"]) == port


def test_prometheus_scrapes_every_gateway_and_loads_the_alerts() -> None:
    """The gateways export the model quality figures the alerts read (gateway/quality.py)."""
    services = compose()["services"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    [sd] = jobs["batchery-gateways"]["dns_sd_configs"]
    # The port the gateway serves inside the compose network (and its /metrics there).
    assert sd["names"] == ["gateway"] and sd["type"] == "A"
    assert "--port 8000" in " ".join(services["gateway"]["command"]) and sd["port"] == 8000
    assert jobs["batchery-gateways"].get("metrics_path", "/metrics") == "/metrics"
    # alerts.yml, named relative to the config, mounted beside it.
    assert scrape["rule_files"] == ["alerts.yml"]
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


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
            [sys.executable, "-m", "batchery.cli", command[0], "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr
        for flag in (c for c in command if c.startswith("--")):
            assert flag.split("=")[0] in proc.stdout, (name, flag)


def test_image_installs_the_worker_from_the_lock_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements/worker.txt" in dockerfile
    assert "pip install --no-deps -e ." in dockerfile
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.M)


def test_every_install_comes_from_a_hashed_lock() -> None:
    """`make demo`, `make test` (and so CI) and the image install the lock's exact versions."""
    makefile = (ROOT / "Makefile").read_text()
    for lock, extras in (("worker", {"worker", "signing"}), ("dev", {"dev"})):
        assert f"--require-hashes -r requirements/{lock}.txt" in makefile
        text = (ROOT / "requirements" / f"{lock}.txt").read_text()
        pins = re.findall(r"^([A-Za-z0-9_.-]+)==\S+ \\$", text, re.M)
        hashes = re.findall(r"--hash=sha256:[0-9a-f]{64}", text)
        assert pins and len(hashes) >= len(pins)
        assert {"celery", "kombu", "celery-batches", "tensorflow-cpu"} <= set(pins)
        assert "tensorflow" not in pins  # the CPU build only, on Linux x86-64
        header = text.split("\n", 2)[1]  # the command that wrote it
        assert all(f"--extra {extra}" in header for extra in extras), header
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = (ROOT / "requirements" / "dev.txt").read_text()
    for pinned in re.findall(r'"([a-z0-9-]+)==([0-9.]+)"', pyproject):
        assert f"{pinned[0]}=={pinned[1]}" in dev, pinned  # the lock follows pyproject.toml
    assert "make lock" in (ROOT / "docs" / "operations.md").read_text()


def test_workers_share_the_model_registry_read_only() -> None:
    services = compose()["services"]
    assert "./models:/app/models:ro" in services["worker"]["volumes"]
    # Only the one-shot admin service may write it.
    writable = [name for name, service in services.items()
                if "./models:/app/models" in service.get("volumes", [])]  # fmt: skip
    assert writable == ["models"] and services["models"]["profiles"] == ["admin"]
    assert "ENV BATCHERY_MODEL_DIR=/app/models" in (ROOT / "Dockerfile").read_text()


def test_the_gateway_scales_on_loopback_and_takes_keys_when_given(tmp_path: Path) -> None:
    gateway = compose()["services"]["gateway"]
    assert "container_name" not in gateway
    [port] = gateway["ports"]
    assert port == "${BIND_ADDRESS:-127.0.0.1}:8000-8009:8000"  # a range: --scale works
    assert gateway["environment"]["BATCHERY_REDIS_URL"].startswith("redis://batchery:")
    assert "./models:/app/models:ro" in gateway["volumes"]
    assert gateway["entrypoint"] == ["sh", "-c"]
    [script] = gateway["command"]
    serve = script.split("exec batchery ", 1)[1].split()
    proc = subprocess.run([sys.executable, "-m", "batchery.cli", *serve[:1], "--help"],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0
    assert all(flag in proc.stdout for flag in serve if flag.startswith("--"))
    # The entrypoint's shell, run with a `batchery` that shows what it was given.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "batchery").write_text('#!/bin/sh\necho "keys=${BATCHERY_API_KEYS:-none} $*"\n')
    (fake / "batchery").chmod(0o755)
    keys = tmp_path / "api-keys"
    for content, expected in (("", "keys=none"), ("alice:" + "0" * 64, f"keys={keys}")):
        keys.write_text(content)
        ran = subprocess.run(["sh", "-c", script.replace("/etc/batchery/api-keys", str(keys))],
                             capture_output=True, text=True,
                             env={"PATH": f"{fake}:/usr/bin:/bin"})  # fmt: skip
        assert ran.stdout.startswith(expected + " serve --host 0.0.0.0"), ran.stdout
    assert (ROOT / "deploy" / "no-api-keys").read_text() == ""  # the default: no keys


def test_a_public_gateway_without_keys_is_refused() -> None:
    strong = "0123456789abcdef0123456789abcdef"
    secrets = dict(REDIS_PASSWORD=strong, FLOWER_PASSWORD=strong, GRAFANA_ADMIN_PASSWORD=strong)
    public = run_check(**secrets, BIND_ADDRESS="0.0.0.0")
    assert public.returncode == 1 and "API_KEYS_FILE" in public.stderr
    assert run_check(**secrets, BIND_ADDRESS="0.0.0.0", API_KEYS_FILE="./keys").returncode == 0
    assert run_check(**secrets, BIND_ADDRESS="127.0.0.1").returncode == 0


def test_every_compose_command_the_docs_show_is_one_the_compose_test_runs() -> None:
    """The compose test's own preflight, in `make test` too: a command written into the
    README or docs that it does not run fails here, not 10 minutes into CI."""
    sys.path.insert(0, str(ROOT / "tests" / "compose"))
    try:
        import run  # tests/compose/run.py
    finally:
        sys.path.remove(str(ROOT / "tests" / "compose"))
    assert sorted(run.documented_commands() - set(run.DOCUMENTED)) == []
