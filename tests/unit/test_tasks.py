"""The batch runner with the shipped model and fakeredis: the batch contract, per-job failures."""

from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest

from producer.errors import BatchContractError
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import STATS_KEY, Job, decode_result_meta, jobs_to_kwargs, result_key
from tests.factories import Request, big_rgb_jpeg, digit_paths, label_of, truncated_png
from worker.models import LoadedModel, ModelCache
from worker.tasks import BatchRunner

ROOT = Path(__file__).resolve().parents[2]
#: The version of the shipped model jobs that name none get.
PROMOTED = Registry(ROOT / "models").promoted("mnist-cnn")


@pytest.fixture
def runner(models: ModelCache, fake_redis: fakeredis.FakeRedis) -> BatchRunner:
    return BatchRunner(Settings(result_ttl_s=600), models, fake_redis)


def job(i: int, image: bytes, **kw: Any) -> Job:
    return Job(id=f"job-{i}", image=image, **kw)


def test_every_job_gets_its_own_stored_result(runner, fake_redis) -> None:
    paths = digit_paths(40)
    jobs = [job(i, p.read_bytes()) for i, p in enumerate(paths)]
    requests = [Request("m1", jobs_to_kwargs(jobs[:25])), Request("m2", jobs_to_kwargs(jobs[25:]))]
    results = runner.run(requests)
    assert [r.job_id for r in results] == [j.id for j in jobs]
    right = sum(r.label == label_of(p) for r, p in zip(results, paths, strict=True))
    assert right >= 38
    for r in results:
        stored = decode_result_meta(fake_redis.get(result_key(r.job_id)))
        assert stored == r.to_dict()
        assert stored["model"] == "mnist-cnn" and stored["version"] == PROMOTED
        assert len(stored["top_k"]) == 3 and stored["top_k"][0]["label"] == stored["label"]
        assert 0 < fake_redis.ttl(result_key(r.job_id)) <= 600
    # 40 jobs through forward passes of at most 16: 16, 16, 8.
    assert sorted({r.batch_size for r in results}) == [8, 16]
    assert int(fake_redis.hget(STATS_KEY, "done")) == 40
    assert int(fake_redis.hget(STATS_KEY, "batches")) == 1


def test_a_broken_image_fails_only_its_own_job(runner) -> None:
    paths = digit_paths(9)
    images = [p.read_bytes() for p in paths]
    images[4] = truncated_png(paths[4])
    results = runner.run([Request("m", jobs_to_kwargs([job(i, b) for i, b in enumerate(images)]))])
    assert [r.status for r in results] == ["SUCCESS"] * 4 + ["FAILURE"] + ["SUCCESS"] * 4
    assert "truncated PNG file" in results[4].error
    assert results[4].model == "mnist-cnn" and results[4].version == PROMOTED


def test_a_jpeg_of_another_size_and_mode_gets_the_same_label(runner) -> None:
    paths = digit_paths(20)
    pngs = runner.run(
        [Request("a", jobs_to_kwargs([job(i, p.read_bytes()) for i, p in enumerate(paths)]))]
    )
    jpegs = runner.run(
        [Request("b", jobs_to_kwargs([job(100 + i, big_rgb_jpeg(p)) for i, p in enumerate(paths)]))]
    )
    same = sum(a.label == b.label for a, b in zip(pngs, jpegs, strict=True))
    assert same >= 19


def test_malformed_messages_fail_the_jobs_they_name_and_spare_the_rest(runner, fake_redis) -> None:
    good = job(1, digit_paths(1)[0].read_bytes())
    requests = [
        Request("bad", {"jobs": [{"id": "broken-1", "image": "%%%"}]}),
        Request("worse", ["not", "kwargs"]),
        Request("good", jobs_to_kwargs([good])),
    ]
    results = {r.job_id: r for r in runner.run(requests)}
    assert results["broken-1"].status == "FAILURE"
    assert "invalid job: image is not valid base64" in results["broken-1"].error
    assert results["job-1"].status == "SUCCESS"
    assert fake_redis.get(result_key("broken-1")) is not None


def test_unknown_model_or_version_fails_with_what_exists(runner) -> None:
    image = digit_paths(1)[0].read_bytes()
    results = runner.run(
        [Request("m", jobs_to_kwargs([job(1, image, model="resnet"), job(2, image, version="7")]))]
    )
    assert "unknown model 'resnet'" in results[0].error and "mnist-cnn" in results[0].error
    assert "no version '7'" in results[1].error


def test_batch_contract_is_checked() -> None:
    info = Registry(ROOT / "models").get("mnist-cnn")
    short = LoadedModel(info, lambda x: np.zeros((len(x) - 1, 10), np.float32), batch_size=8)
    with pytest.raises(BatchContractError, match="3 inputs gave outputs of shape"):
        short.predict(np.zeros((3, 28, 28, 1), np.float32))


def test_a_failed_forward_pass_fails_every_job_it_touched(models, fake_redis) -> None:
    info = models.resolve(None, None)
    broken = LoadedModel(info, lambda x: np.zeros((len(x) + 1, 10), np.float32), batch_size=8)
    models._loaded[info.key], saved = broken, models._loaded[info.key]
    try:
        runner = BatchRunner(Settings(), models, fake_redis)
        paths = digit_paths(5)
        results = runner.run(
            [Request("m", jobs_to_kwargs([job(i, p.read_bytes()) for i, p in enumerate(paths)]))]
        )
    finally:
        models._loaded[info.key] = saved
    assert [r.status for r in results] == ["FAILURE"] * 5
    # Split down to single jobs, each of which still breaks the contract: every job says so.
    assert all("job failed: BatchContractError" in r.error for r in results)
    assert int(fake_redis.hget(STATS_KEY, "failed")) == 5


def test_a_batch_running_when_a_promote_lands_finishes_on_its_old_version(
    tmp_path, fake_redis
) -> None:
    registry = Registry(tmp_path / "models")
    shipped = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"
    for _ in range(2):
        registry.publish(shipped, "mnist-cnn", [str(d) for d in range(10)], (28, 28, 1))
    cache = ModelCache(registry, "mnist-cnn", batch_size=16, threads=1)
    runner = BatchRunner(Settings(), cache, fake_redis)
    real = runner._classify_with

    def promote_mid_batch(model: LoadedModel, jobs: Any) -> Any:
        registry.promote("mnist-cnn", "2")
        cache.refresh()  # what the housekeeping thread does: v2 loaded, new jobs switched
        return real(model, jobs)

    runner._classify_with = promote_mid_batch  # type: ignore[method-assign]
    paths = digit_paths(4)
    batch = [job(i, p.read_bytes()) for i, p in enumerate(paths)]
    running = runner.run([Request("a", jobs_to_kwargs(batch))])
    runner._classify_with = real  # type: ignore[method-assign]
    later = runner.run([Request("b", jobs_to_kwargs([job(9, paths[0].read_bytes())]))])
    assert {r.version for r in running} == {"1"}
    assert [r.version for r in later] == ["2"]
