"""The gateway's parts on their own: API keys, the OpenAPI document against the routes, the
group-committed push and the shared result subscriber (fakeredis)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import fakeredis
import pytest
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from gateway import openapi
from gateway.apikeys import ApiKeys, digest, new_key
from gateway.app import create_app, is_loopback, serve
from gateway.outbox import Outbox
from gateway.waiter import ResultWaiter
from producer.errors import ConfigError, QueueFullError
from producer.settings import Settings
from producer.wire import (
    Job,
    JobResult,
    decode_job_record,
    encode_job_record,
    encode_result_meta,
    job_key,
    queue_key,
    result_key,
)
from tests.factories import digit_paths

DIGIT = digit_paths(1)[0].read_bytes()


def test_keys_file_names_each_key_by_its_hash(tmp_path: Path) -> None:
    alice, line = new_key("alice")
    path = tmp_path / "keys"
    path.write_text(f"# who may submit\n{line}  # since today\n\nbob:{digest('bobs-key')}\n")
    keys = ApiKeys.load(path)
    assert keys.name_of(f"Bearer {alice}") == "alice"
    assert keys.name_of("bearer bobs-key") == "bob"
    assert keys.name_of("Bearer not-a-key") is None
    assert keys.name_of(alice) is None  # no scheme
    assert keys.name_of(None) is None
    assert alice not in path.read_text()  # the file holds hashes only


@pytest.mark.parametrize("text", ["alice\n", "alice:abc\n", "../x:" + "0" * 64 + "\n", "\n"])
def test_a_bad_keys_file_is_refused_with_its_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ConfigError, match="keys"):
        ApiKeys.load(path)


def test_the_openapi_document_is_valid_and_matches_the_routes() -> None:
    settings = Settings()
    document = openapi.document(settings)
    validate(document)
    app = create_app(settings).app  # inside the Guard
    served = {(route.path, method.lower()) for route in app.routes if isinstance(route, Route)
              for method in (route.methods or ()) if method != "HEAD"}  # fmt: skip
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    pages = {("/", "get"), ("/docs", "get"), ("/openapi.json", "get")}
    assert served - pages == documented
    assert {m.path for m in app.routes if isinstance(m, Mount)} == {"/docs/assets", "/static"}


def test_the_document_says_keys_are_needed_only_when_they_are(tmp_path: Path) -> None:
    open_doc = openapi.document(Settings())
    assert open_doc["paths"]["/v1/jobs"]["post"]["security"] == []
    keyed = openapi.document(Settings(api_keys=tmp_path))
    assert keyed["paths"]["/v1/jobs"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in keyed["paths"]["/v1/jobs"]["post"]["responses"]


def test_without_keys_only_loopback_is_served() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ConfigError, match="without API keys"):
        serve(Settings(), host="0.0.0.0")


def test_allow_unauthenticated_serves_a_public_address_without_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    served: list[tuple[str, int]] = []

    # serve() runs uvicorn's Server (with a check for a dropped Ctrl-C): record, not serve.
    def record(self: uvicorn.Server, *args: object, **kwargs: object) -> None:
        served.append((self.config.host, self.config.port))

    monkeypatch.setattr(uvicorn.Server, "run", record)
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        serve(Settings(), host="0.0.0.0", port=8123)
    assert served == []
    serve(Settings(), host="0.0.0.0", port=8123, allow_unauthenticated=True)
    assert served == [("0.0.0.0", 8123)]
    keys = tmp_path / "keys"
    keys.write_text(new_key("alice")[1] + "\n")
    serve(Settings(api_keys=keys), host="0.0.0.0", port=8124)  # keys: no flag needed
    assert served == [("0.0.0.0", 8123), ("0.0.0.0", 8124)]


def test_settings_read_the_gateways_variables(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("")
    settings = Settings.from_env({
        "BATCHERY_API_KEYS": str(keys), "BATCHERY_API_RATE": "2.5", "BATCHERY_API_BURST": "7",
        "BATCHERY_WEBHOOK_SECRET": "x" * 20, "BATCHERY_WEBHOOK_ALLOW": " a.example, 10.0.0.0/8 ,",
        "BATCHERY_HTTP_MAX_BODY": "2048", "BATCHERY_HTTP_MAX_WAIT": "5",
    })  # fmt: skip
    assert (settings.api_keys, settings.api_rate, settings.api_burst) == (keys, 2.5, 7)
    assert settings.webhook_allow == ("a.example", "10.0.0.0/8")
    assert "x" * 20 not in repr(settings)  # the secret never reaches a log
    with pytest.raises(ConfigError, match="16 characters"):
        Settings.from_env({"BATCHERY_WEBHOOK_SECRET": "short"})
    with pytest.raises(ConfigError, match="no such file"):
        Settings.from_env({"BATCHERY_API_KEYS": str(tmp_path / "missing")})


def jobs(n: int) -> list[Job]:
    return [Job(f"job-{i}", DIGIT) for i in range(n)]


def test_pushes_from_concurrent_requests_leave_together() -> None:
    fake = fakeredis.FakeAsyncRedis()

    async def run() -> None:
        outbox = Outbox(fake, Settings())
        await asyncio.gather(*(outbox.enqueue([job], {job.id: encode_job_record("alice")})
                               for job in jobs(100)))  # fmt: skip
        messages = await fake.lrange(queue_key("batchery", "normal"), 0, -1)
        assert 1 <= len(messages) <= 3  # 100 requests, a few pushes
        carried = sum(len(json.loads(json.loads(m)["body"])[1]["jobs"]) for m in messages)
        assert carried == 100
        assert decode_job_record(await fake.get(job_key("job-42"))) == ("alice", None)
        assert await fake.ttl(job_key("job-42")) > 0

    asyncio.run(run())


def test_a_full_queue_refuses_the_push_and_forgets_its_records() -> None:
    fake = fakeredis.FakeAsyncRedis()
    settings = replace(Settings(), max_queue=1)

    async def run() -> None:
        outbox = Outbox(fake, settings)
        await outbox.enqueue(jobs(1), {"job-0": encode_job_record()})
        with pytest.raises(QueueFullError, match="BATCHERY_MAX_QUEUE"):
            await outbox.enqueue([Job("late", DIGIT)], {"late": encode_job_record()})
        assert not await fake.exists(job_key("late"))
        assert await fake.exists(job_key("job-0"))

    asyncio.run(run())


def test_waiters_wake_on_their_own_result_and_see_unpublished_ones_too() -> None:
    fake = fakeredis.FakeAsyncRedis()

    async def run() -> None:
        waiter = ResultWaiter(fake)
        meta = {i: encode_result_meta(JobResult(f"j{i}", "SUCCESS")) for i in range(50)}

        async def answer() -> None:
            await asyncio.sleep(0.2)
            for i in range(49):
                await fake.set(result_key(f"j{i}"), meta[i])
                await fake.publish(result_key(f"j{i}"), meta[i])
            await fake.set(result_key("j49"), meta[49])  # stored, never published

        loop = asyncio.get_running_loop()
        started = loop.time()
        answering = asyncio.create_task(answer())
        got = await waiter.wait([f"j{i}" for i in range(50)], timeout=10)
        await answering
        assert [g.decode() if isinstance(g, bytes) else g for g in got] == list(meta.values())
        assert loop.time() - started < 3  # the published ones woke at once, the other in ~1 s
        (late,) = await waiter.wait(["never"], timeout=0.3)
        assert late is None
        await waiter.close()

    asyncio.run(run())
