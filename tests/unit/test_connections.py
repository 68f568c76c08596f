"""One place builds Redis clients: URLs, Sentinel, TLS, ACL logins, replica acks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from producer import connections
from producer.connections import ReplicaAcks, SentinelAddress
from producer.errors import ConfigError, ReplicaAckError
from producer.settings import Settings

URL = "sentinel://h1:26379;sentinel://h2:26380;sentinel://h3/2"


def sentinel_settings(**env: str) -> Settings:
    return Settings.from_env({"BATCHERY_REDIS_URL": URL, "BATCHERY_SENTINEL_MASTER": "main",
                              **env})  # fmt: skip


def test_a_sentinel_url_in_celerys_form_is_parsed() -> None:
    address = SentinelAddress.parse(URL)
    assert address.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert address.db == 2
    login = SentinelAddress.parse("sentinel://app:p%40ss@h1;sentinel://app:p%40ss@h2/1")
    assert (login.username, login.password, login.db) == ("app", "p@ss", 1)


def test_celery_gets_the_database_and_login_on_every_part() -> None:
    # kombu and Celery read them from the first part only: written out, all readers agree.
    address = SentinelAddress.parse("sentinel://:pw@h1;sentinel://h2:26380/3")
    assert address.celery_url() == "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26380/3"
    assert SentinelAddress.parse(address.celery_url()) == address


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1/0;sentinel://h2/1", "different dbs"),
        ("sentinel://:a@h1;sentinel://:b@h2", "different passwords"),
        ("sentinel://h1;redis://h2", "is not sentinel://"),
        ("sentinel://h1:notaport", "sentinel://h1:notaport"),
        ("sentinel://h1/zero", "is not a number"),
        ("sentinel://:secret@h1:99999", "***"),
    ],
)
def test_a_bad_sentinel_url_is_refused_without_its_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")) as caught:
        SentinelAddress.parse(url)
    assert "secret" not in str(caught.value)


def test_a_sentinel_url_needs_the_masters_name() -> None:
    with pytest.raises(ConfigError, match="BATCHERY_SENTINEL_MASTER"):
        Settings.from_env({"BATCHERY_REDIS_URL": URL})
    with pytest.raises(ConfigError, match="needs a sentinel://"):
        Settings.from_env({"BATCHERY_SENTINEL_TLS": "1"})
    with pytest.raises(ConfigError, match="use 1 or 0"):
        sentinel_settings(BATCHERY_SENTINEL_TLS="maybe")


def test_the_sentinel_password_stays_out_of_repr() -> None:
    settings = sentinel_settings(BATCHERY_SENTINEL_PASSWORD="s3ntinel-secret")
    assert settings.sentinel_password == "s3ntinel-secret"
    assert "s3ntinel-secret" not in repr(settings)


def test_a_client_asks_the_sentinels_with_both_logins() -> None:
    settings = Settings.from_env({
        "BATCHERY_REDIS_URL": "sentinel://app:redis-pw@h1;sentinel://h2/4",
        "BATCHERY_SENTINEL_MASTER": "main",
        "BATCHERY_SENTINEL_USERNAME": "watcher",
        "BATCHERY_SENTINEL_PASSWORD": "sentinel-pw",
    })  # fmt: skip
    client = connections.client(settings, max_connections=7)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "main"
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("app", "redis-pw", 4)
    assert pool.max_connections == 7
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinels] == ["h1", "h2"]
    login = sentinels[0].connection_pool.connection_kwargs
    assert (login["username"], login["password"]) == ("watcher", "sentinel-pw")


def test_sentinel_tls_covers_the_sentinels_and_redis() -> None:
    ca = str(Path(__file__))
    settings = sentinel_settings(BATCHERY_SENTINEL_TLS="1", BATCHERY_REDIS_TLS_CA=ca)
    client = connections.client(settings)
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == ca
    assert pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool
    assert sentinel.connection_kwargs["ssl_ca_certs"] == ca
    assert sentinel.connection_class.__name__ == "SSLConnection"


def test_an_async_client_follows_the_same_sentinels() -> None:
    client = connections.async_client(sentinel_settings(BATCHERY_SENTINEL_PASSWORD="pw-x"))
    pool = client.connection_pool
    assert pool.service_name == "main"
    assert pool.connection_kwargs["db"] == 2
    login = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert login["password"] == "pw-x"


def test_a_plain_url_is_one_redis() -> None:
    client = connections.client(Settings(redis_url="redis://:pw@h:6390/5"))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "h",
        6390,
        5,
        "pw",
    )


def test_replica_acks_leave_wait_room_to_finish() -> None:
    # redis-py gives up on a reply after 5 s by default; WAIT may take its whole timeout.
    settings = Settings(replica_acks=1, replica_ack_timeout_s=8.0)
    assert connections.client(settings).connection_pool.connection_kwargs["socket_timeout"] == 10
    assert connections.client(Settings(replica_acks=1)).connection_pool.connection_kwargs[
        "socket_timeout"
    ] == 7.0  # fmt: skip


def test_the_worker_app_uses_the_sentinels_for_broker_and_results() -> None:
    from celery.backends.redis import SentinelBackend

    from worker.app import create_app
    from worker.transport import SentinelTransport

    settings = sentinel_settings(BATCHERY_SENTINEL_PASSWORD="pw-y")
    app = create_app(settings)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "main"
    assert options["sentinel_kwargs"] == {"password": "pw-y"}
    assert options["prefetch_jobs"] == settings.prefetch_job_limit  # ours are kept too
    assert app.conf.result_backend_transport_options["master_name"] == "main"
    assert app.conf.broker_transport is SentinelTransport
    assert isinstance(app.backend, SentinelBackend)
    assert (
        app.conf.broker_url == "sentinel://h1:26379/2;sentinel://h2:26380/2;sentinel://h3:26379/2"
    )
    # Our checks and weighing ride on kombu's Sentinel channel, with its options.
    channel = SentinelTransport.Channel
    for option in ("master_name", "sentinel_kwargs", "prefetch_jobs", "max_message_bytes"):
        assert option in channel.from_transport_options


def test_replica_acks_raise_when_too_few_replicas_confirm() -> None:
    acks = ReplicaAcks(2, 0.5)
    acks.check([1, 2], "a push")
    with pytest.raises(ReplicaAckError, match="1 of the 2 replicas"):
        acks.check([1, 1], "a push")
    ReplicaAcks(0, 0.5).check([], "nothing asked")


def test_the_scaling_docs_routing_by_model_builds_one_client_per_shard() -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "scaling.md").read_text()
    match = re.search(r"```python\n(from dataclasses.*?)job_id =", text, re.S)
    assert match, "the routing example is gone from docs/scaling.md"
    scope: dict = {}
    exec(match.group(1), scope)  # the docs' own code, up to its first call to Redis
    pools = {model: c.redis.connection_pool for model, c in scope["clients"].items()}
    assert {m: p.service_name for m, p in pools.items()} == {"mnist-cnn": "digits",
                                                             "mobilenet": "photos"}  # fmt: skip
    hosts = {m: [s.connection_pool.connection_kwargs["host"] for s in p.sentinel_manager.sentinels]
             for m, p in pools.items()}  # fmt: skip
    assert hosts == {"mnist-cnn": ["a1", "a2", "a3"], "mobilenet": ["b1", "b2", "b3"]}
