"""Every job answered, whatever it carries: fields checked at the edge, every exception
turned into per-job results, nothing an outsider wrote reaching a log line raw."""

from __future__ import annotations

import base64
import json
import logging
import sys
from typing import Any

import fakeredis
import pytest

from producer.client import Client
from producer.errors import InvalidJobError
from producer.settings import Settings
from producer.wire import (
    MAX_ERROR_CHARS,
    MAX_JOBS_PER_MESSAGE,
    STATS_KEY,
    Job,
    JobResult,
    build_message,
    chunk_jobs,
    excerpt,
    read_jobs,
)
from tests.factories import Request, digit_paths
from worker import preprocess
from worker.logs import EscapeControls
from worker.tasks import OTHER, BatchRunner, answer_each

GOOD = digit_paths(1)[0].read_bytes()


def wire_job(job_id: Any = "good", **fields: Any) -> dict[str, Any]:
    """A valid job's wire dict for ``job_id``, with ``fields`` replaced."""
    return {**Job(str(job_id), GOOD).to_wire(), "id": job_id, **fields}


#: One bad field each, of every kind: the job is refused and says which field and why.
BAD_FIELDS = [
    ("model", "m" * 300, "model"),
    ("model", "../../etc", "model"),
    ("model", ".hidden", "model"),
    ("model", "a/b", "model"),
    ("model", "line\nforged", "model"),
    ("model", 7, "model"),
    ("model", ["mnist-cnn"], "model"),
    ("version", "1" * 65, "version"),
    ("version", {"v": 1}, "version"),
    ("image", 12, "image"),
    ("image", None, "image"),
    ("image", "!!!not base64!!!", "base64"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS)
def test_a_bad_field_refuses_its_own_job_only(field: str, value: Any, named: str) -> None:
    kwargs = {"jobs": [wire_job("a"), wire_job("bad", **{field: value}), wire_job("b")]}
    jobs, refused = read_jobs(kwargs, max_image_bytes=1 << 20)
    assert [job.id for job in jobs] == ["a", "b"]
    [(job_id, reason)] = refused
    assert job_id == "bad" and named in reason
    assert len(reason) < MAX_ERROR_CHARS and "\n" not in reason


@pytest.mark.parametrize("job_id", ["", "x" * 10_000, "a\nb", "tab\tid", 42, None, ["id"]])
def test_a_job_without_a_valid_id_is_refused_with_no_id(job_id: Any) -> None:
    jobs, refused = read_jobs({"jobs": [wire_job(job_id), wire_job("ok")]})
    assert [job.id for job in jobs] == ["ok"]
    assert refused[0].job_id is None and "job id" in refused[0].reason


@pytest.mark.parametrize(
    "submitted_at",
    [10**400, -(10**400), float("nan"), float("inf"), "yesterday", True, 12.5, 5e9, None],
)
def test_an_implausible_submit_time_is_ignored_not_fatal(submitted_at: Any) -> None:
    [job], refused = read_jobs({"jobs": [wire_job("t", submitted_at=submitted_at)]})
    assert not refused and job.submitted_at == 0.0


def test_an_oversized_image_is_refused_before_it_is_decoded(monkeypatch) -> None:
    def never(*_: Any, **__: Any) -> bytes:
        raise AssertionError("decoded an image over the limit")

    huge = base64.b64encode(b"\0" * 3000).decode()
    monkeypatch.setattr(base64, "b64decode", never)
    _, [(job_id, reason)] = read_jobs({"jobs": [wire_job("big", image=huge)]}, 1000)
    assert job_id == "big" and "over the limit of 1000 bytes" in reason


def test_a_message_of_too_many_jobs_fails_each_job_it_names() -> None:
    items = [wire_job(f"j{i}") for i in range(MAX_JOBS_PER_MESSAGE + 1)]
    jobs, refused = read_jobs({"jobs": items})
    assert not jobs and len(refused) == MAX_JOBS_PER_MESSAGE + 1
    assert f"over the limit of {MAX_JOBS_PER_MESSAGE}" in refused[0].reason


def test_excerpts_are_short_and_escaped() -> None:
    text = excerpt("evil\n2026-01-01 INFO forged\x1b[31m" + "x" * 500)
    assert "\n" not in text and "\x1b" not in text and len(text) < 120
    assert text.endswith("(532 characters)")
    assert excerpt(10**400) == "a int"


def test_error_texts_are_bounded() -> None:
    result = JobResult.failure("j", "boom\n" * 1000)
    assert result.error is not None
    assert len(result.error) <= MAX_ERROR_CHARS and "\n" not in result.error


def test_producers_refuse_what_workers_would(fake_redis: fakeredis.FakeRedis) -> None:
    client = Client(settings=Settings(), redis_client=fake_redis)
    for model, version in [("m" * 300, None), ("a/b", None), ("ok", "../1"), ("x\ny", None)]:
        with pytest.raises(InvalidJobError):
            client.submit(GOOD, model=model, version=version)
    assert fake_redis.llen("batchery") == 0


def test_producers_split_messages_by_bytes_as_well_as_jobs() -> None:
    jobs = [Job(f"j{i}", b"\0" * 300_000) for i in range(40)]
    chunks = chunk_jobs(jobs, most_jobs=256, most_bytes=1_000_000)
    assert [job for chunk in chunks for job in chunk] == jobs
    assert all(len(build_message(c, "q").raw) <= 1_000_000 for c in chunks)
    assert chunk_jobs([Job("alone", b"\0" * 2_000_000)], 256, 1_000_000)[0][0].id == "alone"
    assert [len(c) for c in chunk_jobs(jobs[:5], most_jobs=2, most_bytes=1 << 30)] == [2, 2, 1]


def test_image_bytes_are_base64_encoded_once_on_the_wire() -> None:
    image = bytes(range(256)) * 4000  # 1 MB
    raw = build_message([Job("j", image)], "q").raw
    assert len(raw) <= 1.4 * len(image)


# --- the batch contract: whatever raises, every job gets a result -------------------------


def digit_jobs(n: int) -> list[Job]:
    return [Job(f"job-{i}", p.read_bytes()) for i, p in enumerate(digit_paths(n))]


def test_split_finds_the_culprits_in_a_bounded_number_of_calls() -> None:
    jobs = digit_jobs(16)
    calls = []

    def compute(part: Any) -> list[JobResult]:
        calls.append(len(part))
        if any(job.id in ("job-3", "job-11") for job in part):
            raise OSError("[Errno 36] File name too long")
        return [JobResult(job.id, "SUCCESS") for job in part]

    results = answer_each(jobs, compute)
    assert [r.job_id for r in results] == [j.id for j in jobs]
    failed = {r.job_id for r in results if r.status == "FAILURE"}
    assert failed == {"job-3", "job-11"}
    assert all("OSError" in r.error for r in results if r.error)
    assert len(calls) <= 2 * len(jobs) - 1


def test_a_result_count_that_breaks_the_contract_is_split_too() -> None:
    jobs = digit_jobs(4)
    results = answer_each(jobs, lambda part: [JobResult(part[0].id, "SUCCESS")])
    assert [r.status for r in results] == ["SUCCESS"] * 4  # alone, each job keeps it


@pytest.fixture
def runner(models, fake_redis: fakeredis.FakeRedis) -> BatchRunner:
    return BatchRunner(Settings(), models, fake_redis)


def test_a_decoder_raising_anything_fails_only_its_job(runner, monkeypatch) -> None:
    real = preprocess.decode
    jobs = digit_jobs(8)

    def decode(data: bytes, *args: Any) -> Any:
        if data == jobs[5].image:
            raise RuntimeError("a decoder bug")
        return real(data, *args)

    monkeypatch.setattr(preprocess, "decode", decode)
    request = Request("m", {"jobs": [j.to_wire() for j in jobs]})
    results = {r.job_id: r for r in runner.run([request])}
    assert results["job-5"].status == "FAILURE" and "RuntimeError" in results["job-5"].error
    assert all(r.status == "SUCCESS" for jid, r in results.items() if jid != "job-5")


def test_the_issues_examples_strand_nothing(runner, fake_redis) -> None:
    good = [wire_job(f"good-{i}") for i in range(20)]
    long_name = wire_job("long-name", model="m" * 300)
    huge_time = wire_job("huge-time", submitted_at=10**400)
    results = {r.job_id: r for r in runner.run([Request("m", {"jobs": [long_name, *good]})])}
    results.update({r.job_id: r for r in runner.run([Request("n", {"jobs": [huge_time]})])})
    assert results["long-name"].status == "FAILURE" and "model" in results["long-name"].error
    assert results["huge-time"].status == "SUCCESS"  # the time is ignored, not fatal
    assert all(results[f"good-{i}"].status == "SUCCESS" for i in range(20))


def test_a_bug_outside_the_per_job_contract_still_answers_every_job(runner, monkeypatch) -> None:
    def broken(*_: Any) -> Any:
        raise KeyError("a bug of ours")

    monkeypatch.setattr(runner, "_history", broken)
    results = runner.run([Request("m", {"jobs": [j.to_wire() for j in digit_jobs(3)]})])
    assert [r.status for r in results] == ["FAILURE"] * 3
    assert all("internal error: KeyError" in (r.error or "") for r in results)


def test_a_job_computed_again_is_counted_not_stored(runner, fake_redis) -> None:
    jobs = digit_jobs(3)
    runner.store([JobResult(j.id, "SUCCESS", label="1") for j in jobs])
    runner.store([JobResult(j.id, "SUCCESS", label="2") for j in jobs[:2]])
    stats = fake_redis.hgetall(STATS_KEY)
    assert int(stats[b"done"]) == 3 and int(stats[b"computed_twice"]) == 2


def test_jobs_refused_without_an_id_are_counted(runner, fake_redis) -> None:
    runner.run([Request("m", {"jobs": [wire_job("x" * 1000), wire_job("fine")]})])
    assert int(fake_redis.hget(STATS_KEY, "refused")) == 1


def test_metric_labels_are_only_models_the_registry_holds(runner) -> None:
    assert runner._label("mnist-cnn", "1") == ("mnist-cnn", "1")
    assert runner._label("mnist-cnn", None) == ("mnist-cnn", "")
    assert runner._label("made-up", "1") == (OTHER, OTHER)
    assert runner._label("mnist-cnn", "999") == (OTHER, OTHER)


# --- logs ---------------------------------------------------------------------------------


def test_no_log_line_starts_with_text_an_outsider_wrote() -> None:
    record = logging.LogRecord(
        "worker.tasks",
        logging.ERROR,
        __file__,
        1,
        "job %s failed",
        ("id\n2026 INFO forged",),
        None,
    )
    try:
        raise ValueError("bad model\nFORGED LINE")
    except ValueError:
        record.exc_info = sys.exc_info()
    EscapeControls().filter(record)
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert "forged" in text and "FORGED" in text
    for line in text.splitlines():
        assert not line.startswith(("2026 INFO forged", "FORGED"))


def test_json_is_not_needed_to_read_a_refusal() -> None:
    assert json.loads(json.dumps(excerpt("\u202e\x00"))).startswith("'\\u202e")


def test_a_worker_refuses_to_start_on_library_versions_it_was_not_built_for(monkeypatch) -> None:
    from producer.errors import ConfigError
    from worker import compat

    compat.check_libraries()  # what is installed fits
    monkeypatch.setattr(compat, "version", lambda dist: "5.6.2" if dist == "kombu" else "0.11")
    with pytest.raises(
        ConfigError, match=r"kombu 5.6.2 is installed, but Batchery needs kombu>=5.7"
    ):
        compat.check_libraries()
