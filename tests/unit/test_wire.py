import json

import pytest

from producer.errors import WireError
from producer.wire import (
    FAILURE,
    SUCCESS,
    TASK_CLASSIFY,
    Job,
    JobResult,
    TopK,
    decode_result_meta,
    encode_message,
    encode_result_meta,
    job_ids_in,
    jobs_from_kwargs,
    result_key,
)


def make_job(i: int = 0, **kw: object) -> Job:
    return Job(id=f"job-{i}", image=bytes([i % 256]) * 10, **kw)  # type: ignore[arg-type]


def test_job_round_trips_through_json() -> None:
    job = make_job(1, model="mnist-cnn", version="2", submitted_at=1_790_000_000.5)
    assert Job.from_wire(json.loads(json.dumps(job.to_wire()))) == job


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"id": "x"},
        {"id": "", "image": ""},
        {"id": 7, "image": ""},
        {"id": "x", "image": "not base64!!"},
        {"id": "x", "image": "", "model": 3},
        "a string",
        None,
    ],
)
def test_malformed_job_is_a_wire_error(bad: object) -> None:
    with pytest.raises(WireError):
        Job.from_wire(bad)


def test_undecodable_base64_is_a_wire_error_from_its_cause() -> None:
    with pytest.raises(WireError) as info:
        Job.from_wire({"id": "x", "image": "not base64!!"})
    assert info.value.__cause__ is not None


def test_message_is_a_celery_protocol_2_task_in_kombus_redis_envelope() -> None:
    jobs = [make_job(i) for i in range(3)]
    envelope = json.loads(encode_message(jobs, "batchery"))
    assert envelope["content-type"] == "application/json"
    assert envelope["headers"]["task"] == TASK_CLASSIFY
    assert "body_encoding" not in envelope["properties"]  # JSON text: base64 once, not twice
    assert envelope["headers"]["batchery_jobs"] == 3
    assert envelope["properties"]["delivery_info"]["routing_key"] == "batchery"
    args, kwargs, embed = json.loads(envelope["body"])
    assert args == [] and set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert jobs_from_kwargs(kwargs) == jobs
    # What Celery logs carries job ids, never the image bytes.
    assert "job-0" in envelope["headers"]["kwargsrepr"]
    assert jobs[0].to_wire()["image"] not in envelope["headers"]["kwargsrepr"]


def test_a_path_that_is_not_utf8_still_goes_on_the_wire() -> None:
    """os.walk hands a non-UTF-8 file name over with lone surrogates, which orjson refuses:
    the message is still written (escaped, as the standard library always did), so the
    worker fails that job alone rather than the producer its whole push."""
    odd = Job(id="odd", image=b"", path="/data/in/\udcff.png")
    envelope = json.loads(encode_message([make_job(1), odd], "batchery"))
    sent = json.loads(envelope["body"])[1]["jobs"]
    assert Job.from_wire(sent[0]) == make_job(1)
    assert sent[1]["path"] == odd.path
    with pytest.raises(WireError, match="control characters"):  # the worker fails it alone
        Job.from_wire(sent[1])


def test_numpy_scalars_go_on_the_wire_as_numbers_and_arrays_do_not() -> None:
    import numpy as np

    from producer.wire import dumps_json

    assert json.loads(dumps_json({"s": np.float32(0.5), "n": np.int64(3)})) == {"s": 0.5, "n": 3}
    with pytest.raises(TypeError):
        dumps_json({"a": np.zeros(1)})


def test_a_single_job_message_uses_the_job_id_as_task_id() -> None:
    envelope = json.loads(encode_message([make_job(5)], "q"))
    assert envelope["headers"]["id"] == "job-5"


def test_a_chunk_gets_its_own_task_id() -> None:
    envelope = json.loads(encode_message([make_job(1), make_job(2)], "q"))
    assert envelope["headers"]["id"] not in ("job-1", "job-2")


def test_empty_message_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_message([], "q")


def test_job_ids_are_read_from_broken_kwargs_so_those_jobs_can_fail() -> None:
    kwargs = {"jobs": [{"id": "a", "image": "!!"}, {"id": 3}, "junk", {"id": "b"}]}
    assert job_ids_in(kwargs) == ["a", "b"]
    assert job_ids_in(["not", "a", "dict"]) == []
    with pytest.raises(WireError):
        jobs_from_kwargs(kwargs)


def test_result_meta_is_celerys_format_around_our_dict() -> None:
    result = JobResult(
        "j1", SUCCESS, "mnist-cnn", "1", "7", 7, 0.9, [TopK("7", 0.9), TopK("1", 0.05)], None, 8
    )
    meta = json.loads(encode_result_meta(result))
    assert meta["status"] == "SUCCESS" and meta["task_id"] == "j1"
    assert set(meta) >= {"status", "result", "traceback", "children", "date_done", "task_id"}
    assert decode_result_meta(encode_result_meta(result)) == result.to_dict()
    assert set(result.to_dict()) >= {
        "job_id", "status", "model", "version", "label", "class_index", "score", "top_k", "error",
    }  # fmt: skip


def test_failure_result_carries_the_reason() -> None:
    failed = JobResult.failure(make_job(2, model="m"), "cannot decode image")
    assert failed.to_dict()["status"] == FAILURE
    assert failed.to_dict()["error"] == "cannot decode image"
    assert failed.model == "m"


@pytest.mark.parametrize("raw", [b"", b"{", b'{"result": 3}', b'{"status": "SUCCESS"}'])
def test_malformed_result_meta_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_result_meta(raw)


def test_result_key_is_celerys() -> None:
    assert result_key("abc") == "celery-task-meta-abc"


def test_celerys_own_failure_format_reads_as_a_failed_job() -> None:
    meta = json.dumps({
        "status": "FAILURE", "task_id": "j1", "traceback": None, "children": [],
        "result": {"exc_type": "NotRegistered", "exc_message": ["'nope'"],
                   "exc_module": "celery.exceptions"},
    })  # fmt: skip
    result = decode_result_meta(meta)
    assert result["job_id"] == "j1" and result["status"] == "FAILURE"
    assert result["error"] == "NotRegistered: 'nope'"
