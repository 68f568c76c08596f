"""`batchery classify` against a real worker: rows, failures, order, resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.bulk import classify
from producer.client import Client
from tests.factories import corrupt_png, digit_paths, label_of, truncated_png

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def make_folder(root: Path, copies: int) -> list[Path]:
    """``copies`` x the 100 example digits, in nested folders; returns them in walk order."""
    for i in range(copies):
        shutil.copytree(ROOT / "examples" / "digits", root / f"set{i:03d}")
    return sorted(root.rglob("*.png"), key=lambda p: (p.parent.name, p.name))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_with_broken_files_fails_only_those_rows(client: Client, tmp_path) -> None:
    files = make_folder(tmp_path / "in", 1)
    (tmp_path / "in" / "set000" / "5_05.png").write_bytes(corrupt_png(digit_paths(1)[0]))
    (tmp_path / "in" / "set000" / "6_06.png").write_bytes(truncated_png(digit_paths(1)[0]))
    (tmp_path / "in" / "set000" / "7_07.png").write_text("not an image at all")
    summary = classify(client, [str(tmp_path / "in")], tmp_path / "out.jsonl", progress=None)
    rows = jsonl(tmp_path / "out.jsonl")
    assert [r["path"] for r in rows] == [str(p) for p in files]  # input order
    by_name = {Path(r["path"]).name: r for r in rows}
    corrupt, truncated = by_name.pop("5_05.png"), by_name.pop("6_06.png")
    text = by_name.pop("7_07.png")
    assert corrupt["status"] == "FAILURE" and "cannot decode image" in corrupt["error"]
    assert corrupt["job_id"]  # it was sent: the worker refused it
    assert truncated["status"] == "FAILURE" and "truncated PNG file" in truncated["error"]
    assert text["status"] == "FAILURE" and "not a readable image" in text["error"]
    assert text["job_id"] == truncated["job_id"] == ""  # refused before enqueueing
    assert all(r["status"] == "SUCCESS" for r in by_name.values())
    right = sum(r["label"] == label_of(Path(r["path"])) for r in by_name.values())
    assert right >= 93
    assert summary.counts == {"SUCCESS": 97, "FAILURE": 3}


def test_csv_output_and_more_files_than_the_window(client: Client, tmp_path) -> None:
    files = make_folder(tmp_path / "in", 5)
    summary = classify(client, [str(tmp_path / "in")], tmp_path / "out.csv", window=64,
                       progress=None)  # fmt: skip
    with (tmp_path / "out.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "job_id", "status", "label", "score", "error"]
    assert [r["path"] for r in rows] == [str(p) for p in files]
    assert all(r["status"] == "SUCCESS" and float(r["score"]) > 0 for r in rows)
    assert summary.total == 500


def test_unordered_writes_every_path_once(client: Client, tmp_path) -> None:
    files = make_folder(tmp_path / "in", 3)
    classify(client, [str(tmp_path / "in")], tmp_path / "out.jsonl", ordered=False,
             progress=None)  # fmt: skip
    assert sorted(r["path"] for r in jsonl(tmp_path / "out.jsonl")) == sorted(map(str, files))


def test_results_are_forgotten_unless_kept(client: Client, tmp_path) -> None:
    make_folder(tmp_path / "in", 1)
    classify(client, [str(tmp_path / "in")], tmp_path / "a.jsonl", progress=None)
    ids = [r["job_id"] for r in jsonl(tmp_path / "a.jsonl")]
    assert client.fetch(ids) == {}
    classify(client, [str(tmp_path / "in")], tmp_path / "b.jsonl", progress=None,
             keep_results=True)  # fmt: skip
    ids = [r["job_id"] for r in jsonl(tmp_path / "b.jsonl")]
    assert len(client.fetch(ids)) == 100


def test_killed_midway_then_resumed_every_path_exactly_once(redis_server, worker, tmp_path):
    files = make_folder(tmp_path / "in", 40)  # 4,000 files
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchery.cli", "classify", str(tmp_path / "in"), "-o", str(out),
           "--window", "256"]  # fmt: skip
    env = {**os.environ, "BATCHERY_REDIS_URL": redis_server.url}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size > 20_000):
        assert proc.poll() is None, "classify finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(out.read_text().splitlines())
    assert 0 < first < len(files)

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                             cwd=ROOT, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stderr
    rows = jsonl(out)
    assert sorted(r["path"] for r in rows) == sorted(map(str, files))
    assert all(r["status"] == "SUCCESS" for r in rows)
    print(f"\nkilled after {first} rows; resumed; {len(rows)} rows, each path once")


def test_cli_prints_progress_and_a_summary(redis_server, worker, tmp_path) -> None:
    make_folder(tmp_path / "in", 2)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted((tmp_path / "in").rglob("*.png"))[:50]))
    proc = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "classify", str(tmp_path / "in" / "set000"),
         f"@{listing}", "-o", str(tmp_path / "out.jsonl")],
        env={**os.environ, "BATCHERY_REDIS_URL": redis_server.url},
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "150/150" in proc.stderr and "img/s" in proc.stderr  # the tqdm bar
    assert "classified 150: SUCCESS 150 in" in proc.stderr
    assert len(jsonl(tmp_path / "out.jsonl")) == 150


def test_explain_dir_writes_a_heatmap_a_row(client: Client, tmp_path) -> None:
    paths = make_folder(tmp_path / "in", 1)[:20]
    out = tmp_path / "out.csv"
    summary = classify(client, [str(p) for p in paths], out, progress=None,
                       explain_dir=tmp_path / "why")  # fmt: skip
    assert summary.counts["SUCCESS"] == 20
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "job_id", "status", "label", "score", "error", "explanation"]
    heatmaps = [Path(row["explanation"]) for row in rows]
    assert len(set(heatmaps)) == 20 and all(p.parent == tmp_path / "why" for p in heatmaps)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in heatmaps)
