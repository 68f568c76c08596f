"""Feedback with fakeredis: ``Client.feedback`` (counts per version, read back by
``producer.monitoring.read_accuracy``; every refusal, and that a refusal counts nothing),
``POST /v1/jobs/{id}/feedback`` through the ASGI app (its codes, the owner only), and
``batchery feedback`` (its exit status and its line)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest

from gateway.apikeys import new_key
from producer import connections
from producer.client import MAX_LABEL_CHARS, Client
from producer.errors import (
    FeedbackGivenError,
    InvalidLabelError,
    JobNotAnsweredError,
    JobNotFoundError,
    ModelNotFoundError,
    NoPredictionError,
)
from producer.monitoring import read_accuracy
from producer.settings import Settings
from producer.wire import (
    PENDING,
    SUCCESS,
    JobResult,
    TopK,
    encode_job_record,
    encode_result_meta,
    feedback_counts_key,
    feedback_key,
    job_key,
    result_key,
)
from tests.factories import digit_paths
from tests.unit.asgi import AsgiGateway

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
GOOD = digit_paths(1)[0].read_bytes()
MODEL = "mnist-cnn"


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def fake(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def client(fake: fakeredis.FakeRedis) -> Client:
    return Client(settings=Settings(model_dir=MODELS, result_ttl_s=600), redis_client=fake)


def answered(r: fakeredis.FakeRedis, job_id: str, predicted: str = "7", version: str = "1",
             owner: str | None = None, status: str = SUCCESS) -> str:  # fmt: skip
    """Store ``job_id``'s record and its result, as submitting and a worker would."""
    r.set(job_key(job_id), encode_job_record(owner))
    if status == SUCCESS:
        result = JobResult(job_id, SUCCESS, MODEL, version, predicted, int(predicted), 0.9,
                           [TopK(predicted, 0.9)], batch_size=1)  # fmt: skip
    else:
        result = JobResult(job_id, status, MODEL, version, error=f"it was {status.lower()}")
    r.set(result_key(job_id), encode_result_meta(result))
    return job_id


def counts(r: fakeredis.FakeRedis, version: str = "1") -> dict[str, int]:
    raw = r.hgetall(feedback_counts_key(MODEL, version))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


# --- Client.feedback ----------------------------------------------------------------------


def test_feedback_counts_right_and_wrong_per_version_and_monitoring_reads_it(
    client: Client, fake: fakeredis.FakeRedis
) -> None:
    given = [
        client.feedback(answered(fake, "a", "7"), "7"),
        client.feedback(answered(fake, "b", "7"), "1"),
        client.feedback(answered(fake, "c", "3"), "3"),
        client.feedback(answered(fake, "d", "7"), "7"),
        client.feedback(answered(fake, "e", "2", version="2"), "2"),
    ]
    assert given[1] == {"job_id": "b", "model": MODEL, "version": "1", "label": "1",
                        "predicted": "7", "correct": False}  # fmt: skip
    assert [g["correct"] for g in given] == [True, False, True, True, True]
    assert counts(fake) == {"7\t7": 2, "1\t7": 1, "3\t3": 1}
    assert counts(fake, "2") == {"2\t2": 1}
    accuracy = read_accuracy(fake, MODEL, "1")
    assert (accuracy.right, accuracy.jobs) == (3, 4)
    assert accuracy.confusion == {"7": {"7": 2}, "1": {"7": 1}, "3": {"3": 1}}
    assert accuracy.rate == 0.75
    low, high = accuracy.interval or (0.0, 0.0)
    assert 0 < low < 0.75 < high <= 1
    assert (read_accuracy(fake, MODEL, "2").right, read_accuracy(fake, MODEL, "2").jobs) == (1, 1)
    # The job's feedback is its true label, kept as long as results are.
    assert fake.get(feedback_key("b")) == b"1"
    assert 590 < fake.ttl(feedback_key("b")) <= 600


def test_a_second_feedback_is_refused_and_the_first_stands(client, fake) -> None:
    client.feedback(answered(fake, "j", "7"), "7")
    for label in ("7", "1"):
        with pytest.raises(FeedbackGivenError, match=r"already has its feedback .*'7'"):
            client.feedback("j", label)
    assert counts(fake) == {"7\t7": 1}
    assert fake.get(feedback_key("j")) == b"7"


def test_an_unknown_id_is_refused_as_unknown(client, fake) -> None:
    with pytest.raises(JobNotFoundError, match="no job never-seen: never submitted"):
        client.feedback("never-seen", "7")
    assert fake.dbsize() == 0


def test_a_job_not_answered_yet_is_refused(client, fake) -> None:
    job_id = client.submit(GOOD)  # recorded, queued, no result
    with pytest.raises(JobNotAnsweredError, match="not answered yet"):
        client.feedback(job_id, "7")
    fake.set(result_key("p"), encode_result_meta(JobResult("p", PENDING)))
    with pytest.raises(JobNotAnsweredError):
        client.feedback("p", "7")
    assert not fake.exists(feedback_key(job_id), feedback_key("p"))
    assert counts(fake) == {}


@pytest.mark.parametrize("status", ["FAILURE", "EXPIRED", "CANCELLED"])
def test_a_job_answered_without_a_prediction_is_refused(client, fake, status: str) -> None:
    answered(fake, "j", status=status)
    with pytest.raises(NoPredictionError, match=rf"answered {status}.*no prediction"):
        client.feedback("j", "7")
    assert not fake.exists(feedback_key("j"))
    assert counts(fake) == {}


def test_a_stock_celery_failure_is_refused_too(client, fake) -> None:
    meta = {"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad"]},
            "task_id": "j"}  # fmt: skip
    fake.set(result_key("j"), json.dumps(meta))
    with pytest.raises(NoPredictionError, match="FAILURE: ValueError: bad"):
        client.feedback("j", "7")


@pytest.mark.parametrize("label", ["cat", "10", " 7", "07"])
def test_a_label_the_model_does_not_have_is_refused(client, fake, label: str) -> None:
    answered(fake, "j", "7")
    with pytest.raises(InvalidLabelError, match=r"not one of mnist-cnn@1's labels \(0, 1, 2"):
        client.feedback("j", label)
    assert not fake.exists(feedback_key("j"))
    assert counts(fake) == {}
    assert client.feedback("j", "7")["correct"]  # refused, not spent: the job still takes one


@pytest.mark.parametrize(
    "label", [None, 7, b"7", "", "x" * (MAX_LABEL_CHARS + 1), "7\t3", "7\n", "\x00", ["7"]]
)
def test_a_malformed_label_is_refused_before_redis_is_touched(
    client, monkeypatch: pytest.MonkeyPatch, label: Any
) -> None:
    def untouchable(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Redis was touched")

    monkeypatch.setattr(client, "retrying", untouchable)
    monkeypatch.setattr(client, "_feedback", untouchable)
    with pytest.raises(InvalidLabelError, match="label"):
        client.feedback("j", label)


def test_without_the_registry_any_well_formed_label_is_counted(fake, tmp_path) -> None:
    client = Client(settings=Settings(model_dir=tmp_path / "elsewhere"), redis_client=fake)
    answered(fake, "j", "7")
    assert client.feedback("j", "cat")["correct"] is False
    assert read_accuracy(fake, MODEL, "1").confusion == {"cat": {"7": 1}}  # a row of its own
    with pytest.raises(InvalidLabelError):
        client.feedback("k", "7\t7")  # the form is checked everywhere


def test_a_version_the_visible_registry_lacks_is_refused(client, fake) -> None:
    answered(fake, "j", "7", version="99")
    with pytest.raises(ModelNotFoundError, match="no version '99'"):
        client.feedback("j", "7")
    assert not fake.exists(feedback_key("j"))


def test_the_script_counts_what_is_stored_when_it_runs(client, fake, monkeypatch) -> None:
    """Between the read and the script the result may expire, or another feedback land:
    the script checks again, and counts nothing then."""
    script = client._feedback

    def meanwhile(change: Any) -> None:
        def run(**kwargs: Any) -> Any:
            change()
            return script(**kwargs)

        monkeypatch.setattr(client, "_feedback", run)

    answered(fake, "gone", "7")
    meanwhile(lambda: fake.delete(result_key("gone")))
    with pytest.raises(JobNotAnsweredError):  # its record is still there
        client.feedback("gone", "7")
    answered(fake, "raced", "7")
    meanwhile(lambda: fake.set(feedback_key("raced"), "1"))
    with pytest.raises(FeedbackGivenError, match="'1'"):
        client.feedback("raced", "7")
    answered(fake, "cancelled", "7")
    meanwhile(lambda: answered(fake, "cancelled", status="CANCELLED"))
    with pytest.raises(NoPredictionError):
        client.feedback("cancelled", "7")
    assert counts(fake) == {}


# --- POST /v1/jobs/{id}/feedback --------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """API keys for alice and bob, in a keys file at tmp_path/keys."""
    (alice, alice_line), (bob, bob_line) = new_key("alice"), new_key("bob")
    (tmp_path / "keys").write_text(f"{alice_line}\n{bob_line}\n")
    return {"alice": alice, "bob": bob}


@pytest.fixture
def http(server, tmp_path, keys, monkeypatch) -> Iterator[AsgiGateway]:
    """The gateway as an ASGI app on fakeredis, with API keys on."""
    from gateway import app as gateway_app

    def sync_client(settings: Settings) -> Client:
        return Client(settings=settings, redis_client=fakeredis.FakeRedis(server=server))

    monkeypatch.setattr(gateway_app, "Client", sync_client)
    monkeypatch.setattr(connections, "async_client",
                        lambda *a, **k: fakeredis.FakeAsyncRedis(server=server))  # fmt: skip
    settings = Settings(model_dir=MODELS, api_keys=tmp_path / "keys")
    gateway = AsgiGateway(gateway_app.create_app(settings, webhooks=False))
    yield gateway
    gateway.close()


def post(http: AsgiGateway, job_id: str, body: Any, key: str | None,
         content_type: str = "application/json") -> httpx.Response:  # fmt: skip
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.request("POST", f"/v1/jobs/{job_id}/feedback", content=data, headers=headers)


def test_the_route_records_feedback_for_the_jobs_owner_only(http, fake, keys) -> None:
    answered(fake, "mine", "7", owner="alice")
    assert post(http, "mine", {"label": "7"}, None).status_code == 401
    theirs = post(http, "mine", {"label": "7"}, keys["bob"])
    assert theirs.status_code == 404 and theirs.json() == {"error": "no job mine"}
    assert counts(fake) == {}
    ok = post(http, "mine", {"label": "1"}, keys["alice"])
    assert ok.status_code == 200
    assert ok.json() == {"job_id": "mine", "model": MODEL, "version": "1", "label": "1",
                         "predicted": "7", "correct": False}  # fmt: skip
    again = post(http, "mine", {"label": "7"}, keys["alice"])
    assert again.status_code == 409 and "already has its feedback" in again.json()["error"]
    assert counts(fake) == {"1\t7": 1}


def test_the_route_answers_each_refusal_with_its_code(http, fake, keys) -> None:
    alice = keys["alice"]
    answered(fake, "done", "7", owner="alice")
    answered(fake, "failed", owner="alice", status="FAILURE")
    fake.set(job_key("queued"), encode_job_record("alice"))
    cases = [
        ("never-seen", {"label": "7"}, "application/json", 404, "no job never-seen"),
        ("queued", {"label": "7"}, "application/json", 409, "not answered yet"),
        ("failed", {"label": "7"}, "application/json", 409, "answered FAILURE"),
        ("done", {"label": "cat"}, "application/json", 400, "not one of mnist-cnn@1's labels"),
        ("done", {"label": 7}, "application/json", 400, "is not a label"),
        ("done", {"label": "7\t7"}, "application/json", 400, "a tab"),
        ("done", {}, "application/json", 400, "an object with a label"),
        ("done", ["7"], "application/json", 400, "an object with a label"),
        ("done", {"label": "7", "why": "x"}, "application/json", 400, "unknown field 'why'"),
        ("done", b"{label: 7", "application/json", 400, "not JSON"),
        ("done", b"7", "text/plain", 415, "application/json"),
        (".hidden", {"label": "7"}, "application/json", 400, "not an id"),
    ]
    for job_id, body, kind, code, words in cases:
        reply = post(http, job_id, body, alice, kind)
        assert (reply.status_code, words in reply.json()["error"]) == (code, True), (job_id, body)
    assert counts(fake) == {}
    assert post(http, "done", {"label": "7"}, alice, "application/json; charset=utf-8").json()[
        "correct"
    ]


def test_the_route_is_in_the_openapi_document(http) -> None:
    doc = http.request("GET", "/openapi.json").json()
    operation = doc["paths"]["/v1/jobs/{job_id}/feedback"]["post"]
    assert operation["operationId"] == "giveFeedback"
    assert {"200", "400", "401", "404", "409", "415"} <= set(operation["responses"])
    schema = doc["components"]["schemas"]["FeedbackRequest"]
    assert schema["properties"]["label"]["maxLength"] == MAX_LABEL_CHARS


# --- batchery feedback ------------------------------------------------------------------------


@pytest.fixture
def batchery(fake, monkeypatch) -> Any:
    """``batchery ARGS...`` run in this process (its exit status), its Client on fakeredis."""
    from batchery import cli

    def on_fake(settings: Settings) -> Client:
        return Client(settings=settings, redis_client=fake)

    monkeypatch.setattr("producer.client.Client", on_fake)
    monkeypatch.setenv("BATCHERY_MODEL_DIR", str(MODELS))
    return lambda *argv: cli.main(list(argv))


def test_the_command_prints_one_line_and_exits_0(batchery, fake, capsys) -> None:
    answered(fake, "j1", "7")
    answered(fake, "j2", "7")
    assert batchery("feedback", "j1", "7") == 0
    assert batchery("feedback", "j2", "1") == 0
    assert capsys.readouterr().out.splitlines() == [
        "j1: label 7 recorded for mnist-cnn@1 (right)",
        "j2: label 1 recorded for mnist-cnn@1 (wrong: it answered 7)",
    ]
    assert counts(fake) == {"7\t7": 1, "1\t7": 1}


def test_the_command_exits_1_with_the_reason(batchery, fake, capsys) -> None:
    answered(fake, "j", "7")
    fake.set(job_key("queued"), encode_job_record())
    assert batchery("feedback", "j", "7") == 0
    capsys.readouterr()
    for argv, words in [
        (("j", "7"), "already has its feedback"),
        (("never-seen", "7"), "no job never-seen"),
        (("queued", "7"), "not answered yet"),
        (("j", "cat"), "not one of mnist-cnn@1's labels"),
    ]:
        assert batchery("feedback", *argv) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("batchery: error: ") and words in err, err
    assert counts(fake) == {"7\t7": 1}
