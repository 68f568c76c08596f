"""A locked-down deployment: Redis with a password, an ACL user, TLS; signed messages.

Each test starts its own redis-server set up that way and its own worker pointed at it,
submits through the producer, and checks the way in works only with the right credentials,
and that no password leaks into the worker's log, errors or ``batchery status``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from batchery.local import RedisServer, WorkerProcess, free_port
from producer.client import Client
from producer.errors import RedisUnavailableError
from producer.registry import Registry
from producer.settings import Settings
from producer.signing import Signer
from producer.wire import Job, build_message
from tests.factories import digit_paths, label_of, wait_until_serving

pytestmark = pytest.mark.integration
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "mnist-cnn" / "1" / "model.keras"

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "pw-7b1e0c2f-never-logged"


def answered(client: Client, n: int = 4) -> list[dict]:
    paths = digit_paths(n)
    results = client.results(client.submit_many(paths), timeout=60)
    assert [r["status"] for r in results] == ["SUCCESS"] * n
    assert sum(r["label"] == label_of(p) for r, p in zip(results, paths, strict=True)) >= n - 1
    return results


def status_output(env: dict[str, str]) -> dict:
    """``batchery status --json`` as a dict, after checking no password is anywhere in it."""
    shown = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "status", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert PASSWORD not in shown.stdout + shown.stderr
    status: dict = json.loads(shown.stdout)
    return status


def serving_worker(url: str, env: dict[str, str] | None = None) -> WorkerProcess:
    worker = WorkerProcess(url, "--concurrency", "1", env=env).start()
    with Client(settings=Settings.from_env({**(env or {}), "BATCHERY_REDIS_URL": url})) as c:
        wait_until_serving(c, worker)
    return worker


def test_a_password_in_the_url_works_and_is_never_shown() -> None:
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    with RedisServer(port=port, args=("--requirepass", PASSWORD), ready_url=url):
        worker = serving_worker(url)
        try:
            with Client(url) as client:
                answered(client)
            shown = status_output({"BATCHERY_REDIS_URL": url})
            assert shown["workers_alive"] == 1 and shown["done"] >= 4
            assert shown["redis"] == f"redis://:***@127.0.0.1:{port}/0"
            # Without the password: refused, with an error that names the URL but not it.
            wrong = f"redis://:not-{PASSWORD}@127.0.0.1:{port}/0"
            with pytest.raises(RedisUnavailableError) as refused:
                Client(settings=Settings(redis_url=wrong, connect_retry_s=0.5)).submit(
                    digit_paths(1)[0]
                )
            assert f"redis://:***@127.0.0.1:{port}/0" in str(refused.value)
            assert PASSWORD not in str(refused.value)
        finally:
            worker.stop()
        assert PASSWORD not in worker.log_path.read_text()


def test_an_acl_user_with_no_dangerous_commands_is_enough() -> None:
    port = free_port()
    url = f"redis://batchery:{PASSWORD}@127.0.0.1:{port}/0"
    acl = ("--user", "batchery", "on", f">{PASSWORD}", "~*", "&*", "+@all", "-@dangerous",
           "--user", "default", "off")  # fmt: skip
    with RedisServer(port=port, args=acl, ready_url=url):
        worker = serving_worker(url)
        try:
            with Client(url) as client:
                answered(client)
                assert client.redis.acl_whoami() == "batchery"
            # The default user is off: no way in without the user's name and password.
            with pytest.raises(RedisUnavailableError):
                Client(
                    settings=Settings(redis_url=f"redis://127.0.0.1:{port}/0", connect_retry_s=0.5)
                ).submit(digit_paths(1)[0])
            shown = status_output({"BATCHERY_REDIS_URL": url})
            assert shown["workers_alive"] == 1
            assert shown["redis"] == f"redis://batchery:***@127.0.0.1:{port}/0"
        finally:
            worker.stop()
        assert PASSWORD not in worker.log_path.read_text()


@dataclass
class TLSFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def env(self) -> dict[str, str]:
        return {
            "BATCHERY_REDIS_TLS_CA": str(self.ca),
            "BATCHERY_REDIS_TLS_CERT": str(self.client_cert),
            "BATCHERY_REDIS_TLS_KEY": str(self.client_key),
        }


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("batchery-client")
    names = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    files = TLSFiles(*(tmp_path / name for name in names))
    ca.cert_pem.write_to_path(str(files.ca))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    server.private_key_pem.write_to_path(str(files.server_key))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


def test_tls_with_client_certificates_required(tls_files: TLSFiles) -> None:
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0"
    tls = ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_files.server_cert),
           "--tls-key-file", str(tls_files.server_key),
           "--tls-ca-cert-file", str(tls_files.ca), "--tls-auth-clients", "yes")  # fmt: skip
    settings = Settings.from_env({"BATCHERY_REDIS_URL": url, **tls_files.env()})
    with RedisServer(port=port, args=tls, ready_url=url, ready_options=settings.redis_ssl()):
        worker = serving_worker(url, tls_files.env())
        try:
            with Client(settings=settings) as client:
                answered(client)
            assert status_output({"BATCHERY_REDIS_URL": url, **tls_files.env()})["done"] >= 4
            # Plain text, no client certificate, or a server not checked against the CA:
            # each is refused.
            no_cert = Settings(redis_url=url, redis_tls_ca=tls_files.ca, connect_retry_s=0.5)
            no_ca = Settings(redis_url=url, redis_tls_cert=tls_files.client_cert,
                             redis_tls_key=tls_files.client_key, connect_retry_s=0.5)  # fmt: skip
            plain = Settings(redis_url=f"redis://127.0.0.1:{port}/0", connect_retry_s=0.5)
            for refused in (plain, no_cert, no_ca):
                with pytest.raises(RedisUnavailableError):
                    Client(settings=refused).submit(digit_paths(1)[0])
        finally:
            worker.stop()


@dataclass
class SigningFiles:
    key: Path
    cert: Path
    store: Path
    stranger_key: Path
    stranger_cert: Path

    def env(self, key: Path | None = None, cert: Path | None = None) -> dict[str, str]:
        return {
            "BATCHERY_SIGNING_KEY": str(key or self.key),
            "BATCHERY_SIGNING_CERT": str(cert or self.cert),
            "BATCHERY_SIGNING_CERTS": str(self.store),
        }


@pytest.fixture
def signing_files(tmp_path: Path) -> SigningFiles:
    """An RSA key and certificate the workers trust, and a stranger's they don't."""
    rsa = trustme.KeyType.RSA  # Celery's auth serializer takes RSA keys only
    ca = trustme.CA(key_type=rsa)
    ours = ca.issue_cert("producer@batchery", key_type=rsa)
    stranger = ca.issue_cert("stranger@elsewhere", key_type=rsa)
    (tmp_path / "trusted").mkdir()
    files = SigningFiles(tmp_path / "key.pem", tmp_path / "trusted" / "producer.pem",
                         tmp_path / "trusted", tmp_path / "stranger.key",
                         tmp_path / "stranger.pem")  # fmt: skip
    ours.private_key_pem.write_to_path(str(files.key))
    ours.cert_chain_pems[0].write_to_path(str(files.cert))
    stranger.private_key_pem.write_to_path(str(files.stranger_key))
    stranger.cert_chain_pems[0].write_to_path(str(files.stranger_cert))
    return files


def tampered(message_raw: str, other: Job, queue: str) -> str:
    """A signed message whose signed body was swapped for another job's."""
    envelope = json.loads(message_raw)
    packed = base64.b64decode(envelope["body"])
    signer_id, signature, ctype, encoding, _ = packed.split(b"\x00\x01", 4)
    forged_body = json.loads(build_message([other], queue).raw)["body"].encode()
    fields = b"\x00\x01".join([signer_id, signature, ctype, encoding, forged_body])
    envelope["body"] = base64.b64encode(fields).decode()
    envelope["headers"]["id"] = other.id
    return json.dumps(envelope)


def signed_registry(root: Path, files: SigningFiles) -> Registry:
    """The shipped model published into a registry of its own, its manifests signed."""
    settings = Settings.from_env({**files.env(), "BATCHERY_MODEL_DIR": str(root)})
    registry = Registry.from_settings(settings)
    for _ in range(2):
        registry.publish(SHIPPED, "mnist-cnn", [str(d) for d in range(10)], (28, 28, 1))
    return registry


def test_signed_messages_only(
    signing_files: SigningFiles, redis_server: RedisServer, tmp_path: Path
) -> None:
    queue = "signed"
    registry = signed_registry(tmp_path / "models", signing_files)
    env = {**signing_files.env(), "BATCHERY_QUEUE": queue,
           "BATCHERY_MODEL_DIR": str(registry.root)}  # fmt: skip
    url = redis_server.url
    worker = serving_worker(url, env)
    try:
        signed = Client(settings=Settings.from_env({**env, "BATCHERY_REDIS_URL": url}))
        answered(signed)
        image = digit_paths(1)[0]
        unsigned = Client(settings=Settings(redis_url=url, queue=queue))
        stranger = Client(settings=Settings.from_env({
            **signing_files.env(signing_files.stranger_key, signing_files.stranger_cert),
            "BATCHERY_QUEUE": queue, "BATCHERY_REDIS_URL": url}))  # fmt: skip
        refused = {
            "unsigned": (unsigned.submit(image), "untrusted content"),
            "stranger": (stranger.submit(image), "Unknown certificate"),
        }
        genuine = Job("genuine", image.read_bytes())
        forged = Job("forged", image.read_bytes(), model="someone-elses")
        signer = Signer.from_settings(signed.settings)
        raw = tampered(build_message([genuine], queue, signer=signer).raw, forged, queue)
        signed.redis.lpush(queue, raw)
        refused["tampered"] = ("forged", "signature check failed")
        for case, (job_id, reason) in refused.items():
            result = signed.result(job_id, timeout=30)
            assert result["status"] == "FAILURE", case
            assert "message refused" in result["error"] and reason in result["error"], (
                case, result["error"])  # fmt: skip
        assert signed.result("genuine")["status"] == "PENDING"  # never sent as itself
        answered(signed, 2)  # and the worker carries on
        # A manifest edited by hand (trusted: true, to run a Lambda) no longer verifies.
        edited = registry.root / "mnist-cnn" / "2" / "model.json"
        edited.write_text(
            edited.read_text().replace('"color_mode"', '"trusted": true, "color_mode"')
        )
        result = signed.result(signed.submit(image, version="2"), timeout=60)
        assert result["status"] == "FAILURE" and "signature does not verify" in result["error"]
        assert signed.result(signed.submit(image, version="1"), timeout=60)["status"] == "SUCCESS"
    finally:
        worker.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def compose_words(words: list[str], env: dict[str, str]) -> list[str]:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        assert op != ":?", f"compose would refuse: {rest}"
        return rest if op == ":-" else ""

    return [re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, word) for word in words]


def test_the_compose_redis_command_runs_as_written(tmp_path: Path) -> None:
    # The compose stack can't start here (no Docker engine): its Redis command runs directly,
    # word for word, on a free port (redis:7-alpine reads its arguments as this redis-server).
    import redis
    import yaml

    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    password = "compose-redis-password-0123456789"
    command = compose_words(service["command"], {"REDIS_PASSWORD": password})
    assert command[0] == "redis-server"
    port = free_port()
    url = f"redis://batchery:{password}@127.0.0.1:{port}/0"
    with RedisServer(port=port, args=tuple(command[1:]), workdir=tmp_path, ready_url=url):
        r = redis.Redis.from_url(url)
        assert r.set("k", "v") and r.get("k") == b"v"
        assert list(tmp_path.glob("appendonlydir/*.aof")), "no append-only file"
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.flushall()  # -@dangerous
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.config_get("maxmemory-policy")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()  # the default user is off
