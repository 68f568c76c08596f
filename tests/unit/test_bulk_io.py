"""classify's inputs and outputs, without Redis: enumeration, resume bookkeeping, repair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.bulk import DonePaths, RowWriter, count_inputs, iter_inputs
from producer.errors import BatcheryError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("b/2.png", "a/1.jpg", "a/deep/3.PNG", "a/notes.txt", "c.webp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    return tmp_path


def test_directories_are_walked_recursively_sorted_images_only(tree: Path) -> None:
    got = [Path(p).relative_to(tree).as_posix() for p in iter_inputs([str(tree)])]
    assert got == ["c.webp", "a/1.jpg", "a/deep/3.PNG", "b/2.png"]
    assert count_inputs([str(tree)]) == 4


def test_files_globs_and_lists(tree: Path) -> None:
    listing = tree / "list.txt"
    listing.write_text(f"{tree / 'c.webp'}\n\n{tree / 'b/2.png'}\n")
    specs = [str(tree / "a/1.jpg"), str(tree / "b/*.png"), f"@{listing}"]
    got = [Path(p).name for p in iter_inputs(specs)]
    assert got == ["1.jpg", "2.png", "c.webp", "2.png"]


def test_done_paths_membership() -> None:
    done = DonePaths(f"/data/{i}.png" for i in range(1000))
    assert len(done) == 1000
    assert "/data/7.png" in done and "/data/999.png" in done
    assert "/data/1000.png" not in done and "/data/7.jpg" not in done
    assert "/x" not in DonePaths([])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_repairs_a_cut_last_line_and_remembers_paths(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    writer = RowWriter(out, resume=False)
    for i in range(3):
        writer.write({"path": f"p{i}", "job_id": "j", "status": "SUCCESS", "label": "1",
                      "score": 0.5, "error": None})  # fmt: skip
    writer.close()
    with out.open("a") as fh:
        fh.write('{"path": "p9", "job' if suffix == ".jsonl" else "p9,j,SUCC")
    resumed = RowWriter(out, resume=True)
    assert len(resumed.done) == 3 and "p2" in resumed.done and "p9" not in resumed.done
    resumed.write({"path": "p3", "job_id": "", "status": "FAILURE", "label": None,
                   "score": None, "error": "bad, really"})  # fmt: skip
    resumed.close()
    text = out.read_text()
    assert "p9" not in text and text.endswith("\n")
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        assert [r["path"] for r in rows] == ["p0", "p1", "p2", "p3"]
    else:
        lines = text.splitlines()
        assert lines[0] == "path,job_id,status,label,score,error"
        assert lines[-1] == 'p3,,FAILURE,,,"bad, really"' and len(lines) == 5


def test_output_must_be_jsonl_or_csv(tmp_path: Path) -> None:
    with pytest.raises(BatcheryError, match=r"\.jsonl or \.csv"):
        RowWriter(tmp_path / "out.txt", resume=False)


def test_a_classify_run_refuses_odd_files_one_row_each_and_carries_on(tmp_path: Path) -> None:
    import os

    import fakeredis

    from producer.bulk import classify
    from producer.client import Client
    from producer.settings import Settings

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-gif.png").write_bytes(b"GIF89a" + (20000).to_bytes(2, "little") * 2 + b"\0;")
    (folder / "b-tiff.png").write_bytes(b"II*\x00" + b"\x00" * 64)
    (folder / "c-zero.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "d-fifo.png")
    out = tmp_path / "out.jsonl"
    client = Client(settings=Settings(), redis_client=fakeredis.FakeRedis())
    summary = classify(client, [str(folder)], out, progress=None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a-gif.png", "b-tiff.png", "c-zero.png",
                                                    "d-fifo.png"]  # fmt: skip
    assert all(r["status"] == "FAILURE" for r in rows) and summary.total == 4
    assert "format GIF is not accepted" in rows[0]["error"]
    assert "format TIFF is not accepted" in rows[1]["error"]
    assert "not a regular file" in rows[2]["error"] and "not a regular file" in rows[3]["error"]
