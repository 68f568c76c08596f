"""producer.monitoring's read side: distances, grouping, windows, baselines."""

from __future__ import annotations

from collections import Counter

import fakeredis
import numpy as np
import pytest

from producer.monitoring import (
    SCORE_EDGES,
    Profile,
    add_counts,
    baseline_of,
    drift,
    grouped,
    js_distance,
    observe,
    read_window,
    size_class,
)
from producer.wire import MONITOR_BUCKET_S


def test_js_distance_is_zero_for_the_same_and_one_for_disjoint() -> None:
    assert js_distance({"a": 3, "b": 1}, {"a": 30, "b": 10}) == pytest.approx(0.0)
    assert js_distance({"a": 5}, {"b": 5}) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("baseline", "live"), [({"12": 100}, {"3": 100}), ({"3": 100}, {"12": 100})]
)
def test_a_shift_out_of_the_baseline_s_range_is_seen_either_way(
    baseline: dict[str, int], live: dict[str, int]
) -> None:
    base, now = grouped(baseline, live, numeric=True)
    assert js_distance(base, now) == pytest.approx(1.0)


def test_categories_the_baseline_never_saw_are_pooled() -> None:
    base, now = grouped({"7": 10}, {"7": 5, "x": 1, "y": 1}, numeric=False)
    assert now == {"7": 5, "(new)": 2} and base == {"7": 10}


def test_observe_counts_what_a_batch_answered_and_saw() -> None:
    pixels = np.zeros((3, 28, 28, 1), np.uint8)
    pixels[2] = 255
    counts = observe(pixels, ["1", "1", "7"], np.array([0.05, 0.97, 1.0]),
                     [("PNG", 28, 28), ("JPEG", 300, 200), None])  # fmt: skip
    assert counts["n"] == 3 and counts["c:1"] == 2 and counts["c:7"] == 1
    assert counts["s:0"] == 1 and counts[f"s:{SCORE_EDGES.index(0.95)}"] == 1
    assert counts[f"s:{len(SCORE_EDGES) - 1}"] == 1  # a score of 1.0 in the top bin
    assert counts["m:0"] == 2 and counts["m:49"] == 1 and counts["d:0"] == 3
    assert counts["z:32"] == 1 and counts["z:512"] == 1 and counts["f:PNG"] == 1
    assert size_class(28, 28) == "32" and size_class(1, 1) == "1" and size_class(64, 3) == "64"


def test_the_window_sums_the_newest_minutes_until_it_holds_enough_jobs() -> None:
    r = fakeredis.FakeRedis()
    now = 1_000_000 * MONITOR_BUCKET_S + 30
    with r.pipeline() as pipe:
        for minutes_ago, n in [(0, 300), (1, 300), (2, 600), (5, 1000)]:
            add_counts(pipe, "m", "1", Counter({"n": n, "c:1": n}), now - minutes_ago * 60)
        pipe.execute()
    assert read_window(r, "m", "1", 500, now=now).jobs == 600
    assert read_window(r, "m", "1", 1000, now=now).jobs == 1200
    assert read_window(r, "m", "1", 10**6, now=now).jobs == 2200
    assert read_window(r, "m", "1", 900, now=now, oldest_first=True).jobs == 1000


def test_a_version_without_a_recorded_baseline_keeps_its_first_window_once() -> None:
    r = fakeredis.FakeRedis()
    with r.pipeline() as pipe:
        add_counts(pipe, "m", "1", Counter({"n": 50, "c:1": 50}))
        pipe.execute()
    found, source = baseline_of(r, {}, "m", "1", 100)
    assert found is None and "50 of 100" in source
    with r.pipeline() as pipe:
        add_counts(pipe, "m", "1", Counter({"n": 60, "c:2": 60}))
        pipe.execute()
    found, source = baseline_of(r, {}, "m", "1", 100)
    assert found is not None and found.jobs == 110 and source == "first live window"
    with r.pipeline() as pipe:  # later traffic does not move the kept baseline
        add_counts(pipe, "m", "1", Counter({"n": 500, "c:3": 500}))
        pipe.execute()
    again, _ = baseline_of(r, {}, "m", "1", 100)
    assert again is not None and again.counts == found.counts
    live = read_window(r, "m", "1", 1000)
    assert any(d.flagged for d in drift(again, live, 0.2))


def test_low_confidence_is_the_share_under_a_score_edge() -> None:
    profile = Profile(Counter({"n": 10, "s:0": 2, "s:4": 3, "s:12": 5}))
    assert profile.low_confidence(0.5) == pytest.approx(0.5)
    assert profile.low_confidence(0.1) == pytest.approx(0.2)
    assert Profile().low_confidence(0.5) is None
