"""Redis Sentinel: the primary SIGKILLed mid-run, a replica promoted, and no job lost.

A primary, two replicas and three sentinels (``redis-server --sentinel``), every one with a
password, on 127.0.0.1. A worker and a producer reach Redis only through the sentinels. With
BATCHERY_REPLICA_ACKS=1 every push and every batch's result write waits until a replica holds
it, so the promoted replica has every job a producer was told was enqueued and every answer a
worker acknowledged: a run of 5,000 jobs through the kill loses none, and the same producer,
worker, gateway and client carry on without a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import trustme

from batchery.local import GatewayProcess, SentinelSet, WorkerProcess
from producer import connections
from producer.client import Client
from producer.errors import ReplicaAckError
from producer.settings import Settings
from producer.wire import STATS_KEY, backlog_key
from tests.factories import digit_paths, label_of, wait_until_serving

pytestmark = pytest.mark.integration

JOBS = 5000
PER_CALL = 25
VISIBILITY_S = 10
# Kill to last answer: the failover (~2 s), messages the dead primary's worker held coming
# back after the visibility timeout, and the rest of the run (~10 s of work here).
RECOVERY_BOUND_S = 60.0
TLS_VARIABLES = ("REDIS_TLS_CA", "REDIS_TLS_CERT", "REDIS_TLS_KEY", "SENTINEL_TLS")


def test_sigkill_of_the_primary_mid_run_loses_no_job() -> None:
    with SentinelSet(
        password="redis-pw-for-the-test", sentinel_password="sentinel-pw-test"
    ) as cluster:
        env = {**cluster.env(), "BATCHERY_REPLICA_ACKS": "1", "BATCHERY_QUEUE": "failover",
               "BATCHERY_VISIBILITY_TIMEOUT": str(VISIBILITY_S)}  # fmt: skip
        settings = Settings.from_env(env)
        worker = WorkerProcess(cluster.url, "--concurrency", "2", "--batch-size", "16", env=env)
        gateway = GatewayProcess(cluster.url, env=env)
        with worker, gateway, Client(settings=settings) as client:
            wait_until_serving(client, worker)
            assert worker.process is not None
            client.redis.hset(STATS_KEY, "done", 0)
            paths = digit_paths()
            images = [paths[i % len(paths)] for i in range(JOBS)]
            ids: list[str] = []
            errors: list[BaseException] = []

            def produce() -> None:
                # Calls of 25 images, paced so the kill lands in the middle of the run.
                try:
                    for start in range(0, JOBS, PER_CALL):
                        ids.extend(client.submit_many(images[start : start + PER_CALL]))
                        time.sleep(0.004)
                except BaseException as exc:  # reported by the test, not lost in the thread
                    errors.append(exc)

            producer = threading.Thread(target=produce)
            producer.start()
            while len(ids) < JOBS // 3:
                assert producer.is_alive(), errors
                time.sleep(0.01)
            old = cluster.primary_port()
            cluster.server(old).process.kill()  # type: ignore[union-attr]
            killed_at = time.monotonic()
            submitted_at_kill = len(ids)
            producer.join(timeout=120)
            assert not errors, f"the producer failed: {errors[0]!r}"
            assert len(ids) == JOBS

            results = client.results(ids, timeout=RECOVERY_BOUND_S + 60)
            recovered_s = time.monotonic() - killed_at
            lost = [r["job_id"] for r in results if r["status"] != "SUCCESS"]
            labels = [label_of(p) for p in images]
            wrong = sum(r["label"] != label for r, label in zip(results, labels, strict=True))
            stats = client.redis.hgetall(STATS_KEY)
            done, twice = int(stats.get(b"done", 0)), int(stats.get(b"computed_twice", 0))
            new = cluster.primary_port()
            print(f"\nSentinel failover: jobs {JOBS}, submitted before the kill "
                  f"{submitted_at_kill}, lost {len(lost)}, answered twice {done - JOBS}, "
                  f"computed twice {twice}, kill to last answer {recovered_s:.1f} s, "
                  f"primary {old} -> {new}")  # fmt: skip
            assert new != old, "no replica was promoted"
            assert not lost, f"{len(lost)} jobs not answered: {lost[:5]}"
            assert done == JOBS, "a job was answered twice, or an answer was not counted"
            assert wrong <= JOBS * 0.05  # the model's own error rate on these digits is ~3%
            assert recovered_s < RECOVERY_BOUND_S
            # The same worker process carried on: it followed the promoted replica itself.
            assert worker.process.poll() is None
            # So did the gateway, started before the kill, and the CLI finds the new primary.
            answer = httpx.post(f"{gateway.url}/v1/jobs", params={"wait": 30},
                                content=images[0].read_bytes(),
                                headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
            assert answer.status_code == 200, answer.text
            assert answer.json()["jobs"][0]["result"]["label"] == labels[0]
            status = subprocess.run([sys.executable, "-m", "batchery.cli", "status", "--json"],
                                    env={**os.environ, **env}, capture_output=True, text=True,
                                    timeout=60, check=True)  # fmt: skip
            assert json.loads(status.stdout)["done"] == JOBS + 1


def test_sentinels_over_tls_with_an_acl_user_fail_over_too(tmp_path: Path) -> None:
    """Every server and sentinel on TLS only, client certificates required, Redis's default
    user off and an ACL user in the URL: a worker, a producer and the CLI still go through the
    sentinels, before and after the primary dies."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = (tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem")
    ca.cert_pem.write_to_path(str(files[0]))
    cert.cert_chain_pems[0].write_to_path(str(files[1]))
    cert.private_key_pem.write_to_path(str(files[2]))
    with SentinelSet(password="acl-user-password-for-test", username="batchery",
                     sentinel_password="sentinel-pw-test", tls=files) as cluster:  # fmt: skip
        env = {**cluster.env(), "BATCHERY_REPLICA_ACKS": "1", "BATCHERY_QUEUE": "tls"}
        settings = Settings.from_env(env)
        assert settings.redis_url.startswith("sentinel://batchery:")
        # Without TLS the sentinels don't answer; the same settings with TLS and its files
        # (the positive control: they are up, and this is the only difference) do.
        plain = {k: v for k, v in env.items() if "TLS" not in k}
        assert sorted(set(env) - set(plain)) == [f"BATCHERY_{k}" for k in TLS_VARIABLES]
        assert not connections.answers(Settings.from_env(plain), timeout=1.0)
        assert connections.answers(settings, timeout=1.0)
        worker = WorkerProcess(cluster.url, "--concurrency", "1", env=env)
        with worker, Client(settings=settings) as client:
            paths = digit_paths(50)
            before = client.results(client.submit_many(paths), timeout=240)
            assert [r["label"] for r in before] == [label_of(p) for p in paths]
            cluster.server(cluster.primary_port()).process.kill()  # type: ignore[union-attr]
            after = client.results(client.submit_many(paths), timeout=120)
            assert [r["label"] for r in after] == [label_of(p) for p in paths]
            status = subprocess.run([sys.executable, "-m", "batchery.cli", "status", "--json"],
                                    env={**os.environ, **env}, capture_output=True, text=True,
                                    timeout=60, check=True)  # fmt: skip
            assert json.loads(status.stdout)["done"] == 100
            assert worker.process is not None and worker.process.poll() is None


PASSWORD = "redis-pw-for-the-window"
WINDOW_JOBS = 50


def _offset(r: redis.Redis, field: str) -> int:
    return int(r.info("replication")[field])


@pytest.mark.parametrize("acks", [0, 1])
def test_a_push_no_replica_got_is_lost_in_a_failover_unless_acks_are_on(acks: int) -> None:
    """What replica acks protect, shown both ways. The window they close (a push the primary
    acknowledged, not yet on any replica, when it dies) is made certain rather than waited
    for: the primary's replication links are cut, the replicas kept from logging back in (a
    wrong masterauth, put right after the kill), a call of 50 jobs pushed, the primary
    SIGKILLed. Acks off: the producer is told the 50 are enqueued, and the promoted replica
    has never heard of them. Acks on: the producer is told they are not safe (ReplicaAckError),
    and every job it was told was enqueued is on the promoted replica."""
    with SentinelSet(password=PASSWORD, sentinel_password="sentinel-pw-test") as cluster:
        queue = "window"
        env = {**cluster.env(), "BATCHERY_REPLICA_ACKS": str(acks), "BATCHERY_QUEUE": queue,
               "BATCHERY_REPLICA_ACK_TIMEOUT": "0.3"}  # fmt: skip
        paths = digit_paths(WINDOW_JOBS)
        with Client(settings=Settings.from_env(env)) as client:
            safe = client.submit_many(paths)
            old = cluster.primary_port()
            primary = redis.Redis(port=old, password=PASSWORD)
            replicas = [redis.Redis(port=s.port, password=PASSWORD)
                        for s in cluster.servers if s.port != old]  # fmt: skip
            deadline = time.monotonic() + 10
            while any(_offset(r, "slave_repl_offset") < _offset(primary, "master_repl_offset")
                      for r in replicas):  # fmt: skip
                assert time.monotonic() < deadline, "the replicas did not catch up"
                time.sleep(0.01)
            for r in replicas:
                r.config_set("masterauth", "not-the-password")
            primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
            told: list[str] = []
            refused: ReplicaAckError | None = None
            try:
                told = client.submit_many(paths)
            except ReplicaAckError as exc:
                refused = exc
            on_primary = int(primary.get(backlog_key(queue)) or 0)
            cluster.server(old).process.kill()  # type: ignore[union-attr]
            for r in replicas:
                r.config_set("masterauth", PASSWORD)
            deadline = time.monotonic() + 30
            while (new := cluster.primary_port()) == old:
                assert time.monotonic() < deadline, "no replica was promoted"
                time.sleep(0.1)
            kept = int(redis.Redis(port=new, password=PASSWORD).get(backlog_key(queue)) or 0)
        print(f"\nreplica acks {acks}: producer told {len(safe) + len(told)} jobs enqueued, "
              f"{on_primary} on the old primary at the kill, {kept} on the promoted replica, "
              f"lost {len(safe) + len(told) - kept}")  # fmt: skip
        # The second call reached the primary both times: only a replica never saw it.
        assert on_primary == 2 * WINDOW_JOBS
        assert kept == WINDOW_JOBS  # the first call, replicated before the cut
        if acks:
            assert refused is not None and not told  # told "not yet safe", not "enqueued"
        else:
            assert refused is None and len(told) == WINDOW_JOBS  # told "enqueued": all lost
