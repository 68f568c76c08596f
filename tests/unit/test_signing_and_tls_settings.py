"""Message signing and Redis TLS settings, without a broker."""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from pathlib import Path

import fakeredis
import pytest
import trustme
from celery.security.certificate import FSCertStore
from celery.security.serialization import SecureSerializer

from producer.errors import ConfigError, ModelLoadError
from producer.registry import Registry
from producer.settings import Settings
from producer.signing import CONTENT_TYPE, Signer
from producer.wire import Job, build_message, deaths_key, jobs_from_kwargs, jobs_to_kwargs
from tests.factories import Request, digit_paths
from worker.models import ModelCache
from worker.tasks import BatchRunner


@pytest.fixture
def signing(tmp_path: Path) -> Settings:
    rsa = trustme.KeyType.RSA
    cert = trustme.CA(key_type=rsa).issue_cert("producer@batchery", key_type=rsa)
    (tmp_path / "store").mkdir()
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "store" / "cert.pem"))
    return Settings.from_env({
        "BATCHERY_SIGNING_KEY": str(tmp_path / "key.pem"),
        "BATCHERY_SIGNING_CERT": str(tmp_path / "store" / "cert.pem"),
        "BATCHERY_SIGNING_CERTS": str(tmp_path / "store"),
    })  # fmt: skip


def verified(raw: str, settings: Settings) -> list:
    """The payload of a raw message, verified as a worker verifies it."""
    envelope = json.loads(raw)
    assert envelope["content-type"] == CONTENT_TYPE
    checker = SecureSerializer(cert_store=FSCertStore(str(settings.signing_certs)), digest="sha256")
    return checker.deserialize(envelope["body"].encode())


def test_a_signed_message_verifies_against_the_store(signing: Settings) -> None:
    job = Job("j", b"\x89PNG...")
    raw = build_message([job], "q", signer=Signer.from_settings(signing)).raw
    _, kwargs, _ = verified(raw, signing)
    assert jobs_from_kwargs(kwargs) == [job]


def test_a_worker_isolating_a_job_signs_the_message_too(signing, models: ModelCache) -> None:
    r = fakeredis.FakeRedis()
    runner = BatchRunner(signing, models, r)
    jobs = [Job(f"j{i}", p.read_bytes()) for i, p in enumerate(digit_paths(2))]
    r.set(deaths_key("j1"), 1)
    runner.run([Request("m", jobs_to_kwargs(jobs))])
    [raw] = r.lrange(signing.queue, 0, -1)
    _, kwargs, _ = verified(raw.decode(), signing)
    assert [j.id for j in jobs_from_kwargs(kwargs)] == ["j1"] and kwargs["alone"] is True


def test_unsigned_settings_sign_nothing() -> None:
    assert Signer.from_settings(Settings()) is None
    raw = build_message([Job("j", b"x")], "q").raw
    assert json.loads(raw)["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BATCHERY_SIGNING_KEY": __file__}, "needs BATCHERY_SIGNING_KEY, BATCHERY_SIGNING_CERT"),
        ({"BATCHERY_SIGNING_KEY": "/no/such/key.pem"}, "no such file"),
        ({"BATCHERY_REDIS_TLS_CA": __file__}, "is not rediss://"),
        ({"BATCHERY_REDIS_URL": "rediss://h:6380/0", "BATCHERY_REDIS_TLS_CERT": __file__},
         "go together"),
    ],
)  # fmt: skip
def test_half_configured_security_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_tls_options_always_verify_the_server() -> None:
    assert Settings(redis_url="redis://h:6379/0").redis_ssl() == {}
    assert Settings(redis_url="rediss://h:6380/0").redis_ssl() == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED
    }
    ca = Path(__file__)
    full = Settings(redis_url="rediss://h:6380/0", redis_tls_ca=ca, redis_tls_cert=ca,
                    redis_tls_key=ca)  # fmt: skip
    assert full.redis_ssl() == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca),
        "ssl_certfile": str(ca), "ssl_keyfile": str(ca),
    }  # fmt: skip


# --- signed manifests ----------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "mnist-cnn" / "1" / "model.keras"
DIGITS = [str(d) for d in range(10)]


def signed_registry(signing: Settings, root: Path) -> Registry:
    return Registry.from_settings(replace(signing, model_dir=root))


def test_publish_and_promote_sign_and_workers_check(signing, tmp_path) -> None:
    registry = signed_registry(signing, tmp_path / "models")
    registry.publish(SHIPPED, "m", DIGITS, (28, 28, 1))
    registry.publish(SHIPPED, "m", DIGITS, (28, 28, 1))
    registry.promote("m", "2")
    assert registry.get("m").version == "2" and registry.get("m", "1").trusted is False
    # A worker's registry checks; one without signing set up reads anything.
    assert Registry(tmp_path / "models").get("m", "1").version == "1"


@pytest.mark.parametrize("tamper", ["trusted", "moved", "unsigned", "promoted", "stranger"])
def test_a_manifest_changed_after_signing_is_refused(signing, tmp_path, tamper) -> None:
    registry = signed_registry(signing, tmp_path / "models")
    for _ in range(2):
        registry.publish(SHIPPED, "m", DIGITS, (28, 28, 1))
    v1 = tmp_path / "models" / "m" / "1"
    if tamper == "trusted":  # edited by hand to run code Keras safe_mode would refuse
        meta = json.loads((v1 / "model.json").read_text())
        (v1 / "model.json").write_text(json.dumps({**meta, "trusted": True}))
        refused = lambda: registry.get("m", "1")  # noqa: E731
    elif tamper == "moved":  # version 2's signed manifest passed off as version 1's
        for name in ("model.json", "model.json.sig"):
            (v1 / name).write_bytes((v1.parent / "2" / name).read_bytes())
        refused = lambda: registry.get("m", "1")  # noqa: E731
    elif tamper == "unsigned":
        (v1 / "model.json.sig").unlink()
        refused = lambda: registry.get("m", "1")  # noqa: E731
    elif tamper == "promoted":  # PROMOTED rewritten by hand
        (v1.parent / "PROMOTED").write_text("2\n")
        refused = lambda: registry.promoted("m")  # noqa: E731
    else:  # signed, but by a key the workers don't trust
        rsa = trustme.KeyType.RSA
        other = trustme.CA(key_type=rsa).issue_cert("stranger", key_type=rsa)
        other.private_key_pem.write_to_path(str(tmp_path / "stranger.key"))
        other.cert_chain_pems[0].write_to_path(str(tmp_path / "stranger.pem"))
        stranger = replace(signing, signing_key=tmp_path / "stranger.key",
                           signing_cert=tmp_path / "stranger.pem")  # fmt: skip
        Registry(tmp_path / "models", key=signed_registry(stranger, tmp_path).key).sign("m", "1")
        refused = lambda: registry.get("m", "1")  # noqa: E731
    with pytest.raises(ModelLoadError, match=r"not signed|does not verify"):
        refused()
    assert registry.get("m", "2").version == "2"  # the others still load


def test_models_sign_vouches_for_an_existing_registry(signing, tmp_path) -> None:
    plain = Registry(tmp_path / "models")
    plain.publish(SHIPPED, "m", DIGITS, (28, 28, 1))
    checking = signed_registry(signing, tmp_path / "models")
    with pytest.raises(ModelLoadError, match="not signed"):
        checking.get("m", "1")
    Registry(tmp_path / "models", key=checking.key).sign("m")
    assert checking.get("m").version == "1"
