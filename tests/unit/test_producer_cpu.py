"""The producer's cost per file (bench.producer_cpu) and the parts of classify that bound it:
the small-file reader, read-ahead only for large files, job ids made in bulk, polling."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from bench.producer_cpu import Cpu, make_files, margin
from producer.bulk import LARGE_FILE, _read_ahead_when_large, classify
from producer.client import Client
from producer.errors import InvalidImageError
from producer.images import check_image_bytes, read_file
from producer.settings import Settings
from producer.wire import JobResult, encode_result_meta, new_job_ids, result_key


def test_the_margin_comes_from_the_runs_least_cpu_of_each_size() -> None:
    calls: list[int] = []

    def run(n: int) -> Cpu:  # start-up 0.4 s, 30 µs user + 5 µs system a file, then noise
        calls.append(n)
        noise = 0.5 if len(calls) <= 2 else 0.0  # the first pair ran on a busy machine
        return Cpu(0.3 + n * 30e-6 + noise, 0.1 + n * 5e-6)

    result = margin(run, 1000, runs=2)
    assert calls == [1000, 2000, 1000, 2000]
    assert result.small.total == pytest.approx(0.4 + 1000 * 35e-6)
    assert result.large.total == pytest.approx(0.4 + 2000 * 35e-6)
    assert result.per_file_s == pytest.approx(35e-6)
    assert "35.0 µs per file" in result.line()
    slower = margin(lambda n: Cpu(0.3 + n * 90e-6, 0.0), 500, runs=1)
    assert slower.per_file_s == pytest.approx(90e-6)


def test_bench_files_are_valid_small_pngs(tmp_path: Path) -> None:
    folder = make_files(tmp_path / "in", 1002)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 1002 and len({p.parent for p in files}) == 2
    assert all(check_image_bytes(p.read_bytes(), str(p), 1000, 28 * 28) == "PNG" for p in files)


def test_read_file_reads_a_small_file_whole_and_refuses_the_rest_unread(tmp_path: Path) -> None:
    """The one reader of image files (producer.images.read_file): a file read in one call of
    its size plus one byte, and each refusal made before reading, without blocking."""
    (tmp_path / "ok.png").write_bytes(b"\x89PNG" + b"x" * 300)
    (tmp_path / "big.png").write_bytes(b"x" * 5000)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.png")  # opened without blocking: refused, not waited on
    assert read_file(tmp_path / "ok.png", 304) == b"\x89PNG" + b"x" * 300
    assert read_file(str(tmp_path / "big.png"), 5000) == b"x" * 5000
    assert read_file(tmp_path / "empty.png", 1000) == b""
    refusals = {"big": "5000 bytes is over the limit of 1000", "dir": "is a directory",
                "zero": "not a regular file", "fifo": "not a regular file",
                "missing": "no such file"}  # fmt: skip
    for name, reason in refusals.items():
        with pytest.raises(InvalidImageError, match=reason):
            read_file(tmp_path / f"{name}.png", 1000)


def test_small_files_are_read_in_line_large_ones_ahead_in_order() -> None:
    sizes = [10] * 5 + [LARGE_FILE * 4] * 12 + [10] * 40
    where: dict[int, str] = {}

    def work(item: str) -> Any:
        i = int(item)
        where[i] = threading.current_thread().name
        if i == 3:
            raise OSError("broken")
        return {"image": b"x" * sizes[i]}

    got = list(_read_ahead_when_large(iter(str(i) for i in range(len(sizes))), work, 2))
    assert [item for item, _ in got] == [str(i) for i in range(len(sizes))]
    assert isinstance(got[3][1], OSError) and len(got[5][1]["image"]) == LARGE_FILE * 4
    main = threading.main_thread().name
    assert all(where[i] == main for i in range(6))  # small: no thread handoff
    assert any(where[i] != main for i in range(6, 17))  # large: read ahead
    assert all(where[i] == main for i in range(40, len(sizes)))  # small again


def test_job_ids_made_in_bulk_are_distinct_uuid4s() -> None:
    ids = new_job_ids(1000)
    assert len(set(ids)) == 1000 and new_job_ids(0) == []
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_classify_answers_every_file_in_order_with_few_round_trips(tmp_path: Path) -> None:
    folder = make_files(tmp_path / "in", 600)
    (folder / "0000" / "0000007.png").write_bytes(b"broken")
    redis_client = fakeredis.FakeRedis()
    client = Client(settings=Settings(chunk_size=16), redis_client=redis_client)
    enqueue, fetch = client.enqueue, client.fetch
    fetches = 0

    def answered_at_once(jobs: Any, records: Any = None) -> None:  # a worker's stand-in
        enqueue(jobs, records)
        for job in jobs:
            meta = encode_result_meta(JobResult(job.id, "SUCCESS", label="7"))
            redis_client.set(result_key(job.id), meta)

    def counted(job_ids: Any, forget: Any = ()) -> Any:
        nonlocal fetches
        fetches += bool(job_ids or forget)
        return fetch(job_ids, forget)

    client.enqueue, client.fetch = answered_at_once, counted  # type: ignore[method-assign]
    summary = classify(client, [str(folder)], tmp_path / "out.csv", window=100, progress=None)
    rows = (tmp_path / "out.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(p) for p in sorted(folder.rglob("*.png"))]
    assert summary.counts == {"SUCCESS": 599, "FAILURE": 1}
    assert fetches < 40  # looks find answers a batch at a time, not a job at a time
    assert not redis_client.keys(result_key("*"))  # collected results were forgotten
