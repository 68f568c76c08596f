"""Model quality in production: what a version's answers and inputs look like, and drift.

Write cheap, read rich. A worker turns each batch into a few counts per model version
(:func:`observe`: classes answered, top-1 score bins, bins of each input's pixel mean and
spread, input sizes and formats) and adds them, in the batch's result pipeline, to that
minute's hash (:func:`add_counts`). Everything that compares lives here, on the read side
(``batchery monitor``, the gateway's metrics, the canary's guardrails): a :class:`Profile`
summed from the newest minutes until it holds enough jobs, compared with the version's
baseline (from its manifest, recorded by ``models publish --baseline-dir`` or ``models
evaluate --record``; else its first live window, kept in Redis) distribution by distribution
with the Jensen-Shannon distance.

The same :func:`observe` builds a baseline from a folder and a live window from batches, so
the two are measured alike. numpy only: no TensorFlow here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from producer.errors import BatcheryError
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import (
    MONITOR_BUCKET_S,
    MONITOR_TTL_S,
    feedback_counts_key,
    live_baseline_key,
    monitor_key,
)

log = logging.getLogger(__name__)

#: Top-1 score bins: finer near 1, where a good model's answers are.
SCORE_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)
#: Bins of an input's mean pixel intensity (0..1) and of its spread (standard deviation, 0..0.5).
PIXEL_BINS = 50
#: The distributions compared, by their field prefix in a profile.
DISTRIBUTIONS = {
    "c": "class mix",
    "s": "top-1 score",
    "m": "pixel mean",
    "d": "pixel spread",
    "z": "input size",
    "f": "input format",
}
#: Numeric distributions: their fine bins are merged into about this many groups of equal
#: baseline mass before comparing (fewer, fuller groups: less noise from small samples).
GROUPS = 10
#: Minutes a reader looks back (the buckets live MONITOR_TTL_S).
LOOKBACK_MIN = 60


def size_class(width: int, height: int) -> str:
    """An input's size class: its longer side rounded up to a power of two."""
    side = max(1, width, height)
    return str(1 << (side - 1).bit_length())


def observe(
    pixels: np.ndarray,
    labels: Sequence[str],
    scores: np.ndarray,
    headers: Sequence[tuple[str, int, int] | None] = (),
) -> Counter[str]:
    """The monitoring counts of a batch's answered jobs.

    ``pixels``: their decoded inputs (uint8, N x H x W x C, what the model was given);
    ``labels`` and ``scores``: their top-1 answers; ``headers``: each input's format, width
    and height before resizing (None where unknown). A few vectorized operations a batch.
    """
    counts: Counter[str] = Counter()
    n = len(labels)
    if n == 0:
        return counts
    counts["n"] = n
    counts.update(f"c:{label}" for label in labels)
    score_bins = np.searchsorted(SCORE_EDGES, np.asarray(scores, np.float64), side="right") - 1
    counts.update(f"s:{i}" for i in np.clip(score_bins, 0, len(SCORE_EDGES) - 1).tolist())
    flat = pixels.reshape(n, -1).astype(np.float32) * np.float32(1 / 255)
    means = flat.mean(axis=1)
    spreads = flat.std(axis=1)
    counts.update(f"m:{i}" for i in _bins(means, 1.0).tolist())
    counts.update(f"d:{i}" for i in _bins(spreads, 0.5).tolist())
    for header in headers:
        if header is not None:
            fmt, width, height = header
            counts[f"z:{size_class(width, height)}"] += 1
            counts[f"f:{fmt}"] += 1
    return counts


def _bins(values: np.ndarray, top: float) -> np.ndarray:
    return np.clip((values * (PIXEL_BINS / top)).astype(np.int64), 0, PIXEL_BINS - 1)


def add_counts(pipe: Any, model: str, version: str, counts: Mapping[str, int],
               now: float | None = None) -> None:  # fmt: skip
    """Queue ``counts`` onto this minute's hash of ``model@version`` in ``pipe`` (the
    batch's result pipeline: no round trip of its own)."""
    if not counts:
        return
    minute = int((time.time() if now is None else now) // MONITOR_BUCKET_S)
    key = monitor_key(model, version, minute)
    pipe.eval(_ADD, 1, key, MONITOR_TTL_S, *(x for item in counts.items() for x in item))


# One script a version a batch: the fields' increments and the expiry, in one command.
_ADD = """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


@dataclass
class Profile:
    """Counts of a version's answers and inputs over some jobs (a window, or a baseline)."""

    counts: Counter[str] = field(default_factory=Counter)
    since: float | None = None  # the oldest minute summed, epoch seconds

    @property
    def jobs(self) -> int:
        """Jobs answered (with a score) in this profile."""
        return self.counts.get("n", 0)

    def distribution(self, prefix: str) -> dict[str, int]:
        """One distribution's counts: bin or category -> jobs."""
        start = f"{prefix}:"
        return {k[len(start) :]: v for k, v in self.counts.items() if k.startswith(start)}

    def low_confidence(self, threshold: float) -> float | None:
        """Share of jobs whose top-1 score is under ``threshold`` (rounded down to a bin
        edge of :data:`SCORE_EDGES`); None without jobs."""
        if not self.jobs:
            return None
        edge = max(i for i, e in enumerate(SCORE_EDGES) if e <= threshold)
        low = sum(v for k, v in self.distribution("s").items() if int(k) < edge)
        return low / self.jobs

    def to_json(self) -> dict[str, Any]:
        """As a manifest's ``baseline`` stores it."""
        return {"jobs": self.jobs, "counts": dict(sorted(self.counts.items()))}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Profile:
        """From :meth:`to_json`'s form."""
        counts = raw.get("counts") or {}
        return cls(Counter({str(k): int(v) for k, v in counts.items()}))

    @classmethod
    def from_hashes(cls, hashes: Iterable[Mapping[Any, Any]]) -> Profile:
        """The sum of minute hashes as Redis returns them."""
        counts: Counter[str] = Counter()
        for h in hashes:
            for k, v in h.items():
                counts[_text(k)] += int(v)
        return cls(counts)


def read_window(client: redis.Redis, model: str, version: str, jobs: int,
                now: float | None = None, oldest_first: bool = False) -> Profile:  # fmt: skip
    """``model@version``'s newest minutes summed until they hold ``jobs`` jobs (or the last
    :data:`LOOKBACK_MIN` minutes, if fewer); ``oldest_first``: its first minutes instead."""
    minute = int((time.time() if now is None else now) // MONITOR_BUCKET_S)
    minutes = list(range(minute, minute - LOOKBACK_MIN - 1, -1))
    with client.pipeline(transaction=False) as pipe:
        for m in minutes:
            pipe.hgetall(monitor_key(model, version, m))
        hashes = pipe.execute()
    pairs = list(zip(minutes, hashes, strict=True))
    if oldest_first:
        pairs.reverse()
    profile = Profile()
    for m, h in pairs:
        if not h:
            continue
        profile.counts.update(Profile.from_hashes([h]).counts)
        profile.since = float(m * MONITOR_BUCKET_S)
        if profile.jobs >= jobs:
            break
    return profile


def baseline_of(client: redis.Redis, meta: Mapping[str, Any], model: str, version: str,
                jobs: int) -> tuple[Profile | None, str]:  # fmt: skip
    """A version's baseline and where it came from: its manifest's, else the one kept from
    its first live window, else that window now if it holds ``jobs`` jobs (then kept)."""
    recorded = meta.get("baseline")
    if isinstance(recorded, Mapping) and recorded.get("counts"):
        return Profile.from_json(recorded), f"manifest ({recorded.get('source', 'data')})"
    key = live_baseline_key(model, version)
    raw = client.get(key)
    if raw is not None:
        return Profile.from_json(json.loads(raw)), "first live window"
    first = read_window(client, model, version, jobs, oldest_first=True)
    if first.jobs < jobs:
        return None, f"none yet (first live window: {first.jobs} of {jobs} jobs)"
    # Kept as it was: later windows are compared with it, not with themselves. NX: two
    # readers at once keep the same first window.
    client.set(key, json.dumps({**first.to_json(), "since": first.since}), nx=True)
    return Profile.from_json(json.loads(client.get(key) or b"{}")), "first live window"


def js_distance(expected: Mapping[str, float], actual: Mapping[str, float]) -> float:
    """The Jensen-Shannon distance (base 2: 0 same, 1 disjoint) of two count tables."""
    keys = sorted(set(expected) | set(actual))
    p = np.array([expected.get(k, 0) for k in keys], np.float64)
    q = np.array([actual.get(k, 0) for k in keys], np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def grouped(baseline: Mapping[str, int], live: Mapping[str, int], numeric: bool
            ) -> tuple[dict[str, int], dict[str, int]]:  # fmt: skip
    """Both tables over the same groups: numeric bins merged into runs of about 1/GROUPS of
    the baseline's mass each; categories kept, those the baseline never saw pooled."""
    if not numeric:
        seen = set(baseline)
        pooled: Counter[str] = Counter()
        for k, v in live.items():
            pooled[k if k in seen else "(new)"] += v
        return dict(baseline), dict(pooled)
    total = sum(baseline.values()) or 1
    edges = sorted({int(k) for k in baseline} | {int(k) for k in live})
    lowest = min((int(k) for k, v in baseline.items() if v), default=0)
    group_of: dict[int, int] = {}
    group, mass = 0, 0
    for b in edges:
        if b < lowest:  # below all the baseline saw: a group of its own, never merged in
            group_of[b] = -1
            continue
        group_of[b] = group
        mass += baseline.get(str(b), 0)
        if mass >= total / GROUPS:
            group, mass = group + 1, 0
    base: Counter[str] = Counter()
    now: Counter[str] = Counter()
    for k, v in baseline.items():
        base[str(group_of[int(k)])] += v
    for k, v in live.items():
        now[str(group_of[int(k)])] += v
    return dict(base), dict(now)


@dataclass(frozen=True)
class Drift:
    """One distribution's drift: its distance from the baseline and whether it is flagged."""

    name: str
    distance: float
    threshold: float

    @property
    def flagged(self) -> bool:
        """Over the threshold."""
        return self.distance > self.threshold


def drift(baseline: Profile, live: Profile, threshold: float) -> list[Drift]:
    """Each distribution's drift from ``baseline`` to ``live`` (those both have data for)."""
    found = []
    for prefix, name in DISTRIBUTIONS.items():
        base, now = baseline.distribution(prefix), live.distribution(prefix)
        if not base or not now:
            continue
        base, now = grouped(base, now, numeric=prefix in "smd")
        found.append(Drift(name, js_distance(base, now), threshold))
    return found


@dataclass(frozen=True)
class Accuracy:
    """Live accuracy from feedback: right of ``jobs``, with a 95% Wilson interval."""

    right: int
    jobs: int
    confusion: dict[str, dict[str, int]]  # true label -> predicted label -> jobs

    @property
    def rate(self) -> float | None:
        """Right / jobs; None without feedback."""
        return self.right / self.jobs if self.jobs else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson score interval of the rate."""
        if not self.jobs:
            return None
        z, n, p = 1.96, self.jobs, self.right / self.jobs
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def read_accuracy(client: redis.Redis, model: str, version: str) -> Accuracy:
    """``model@version``'s feedback so far."""
    confusion: dict[str, dict[str, int]] = {}
    right = total = 0
    for raw, count in client.hgetall(feedback_counts_key(model, version)).items():
        true, _, predicted = _text(raw).partition("\t")
        n = int(count)
        confusion.setdefault(true, {})[predicted] = n
        total += n
        right += n if true == predicted else 0
    return Accuracy(right, total, confusion)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


#: Fewest jobs in a window before drift is flagged: below it, sampling noise alone moves the
#: distances (shown, not flagged).
MIN_JOBS = 200


@dataclass(frozen=True)
class VersionReport:
    """One version's monitoring, as ``batchery monitor`` and the gateway's gauges show it."""

    model: str
    version: str
    promoted: bool
    live: Profile
    baseline: Profile | None
    baseline_source: str
    drifts: tuple[Drift, ...]
    threshold: float
    enough_jobs: bool
    accuracy: Accuracy
    low_confidence: float | None

    @property
    def drifted(self) -> bool:
        """A distribution flagged, on a window of enough jobs."""
        return self.enough_jobs and any(d.flagged for d in self.drifts)


def report(client: redis.Redis, registry: Registry, settings: Settings, model: str,
           version: str, promoted: str | None = None) -> VersionReport:  # fmt: skip
    """``model@version``'s live window against its baseline, and its feedback."""
    window_jobs = settings.monitor_window_jobs
    live = read_window(client, model, version, window_jobs)
    recorded = registry.baseline(model, version)
    meta = {**registry.get(model, version).meta, **({"baseline": recorded} if recorded else {})}
    baseline, source = baseline_of(client, meta, model, version, window_jobs)
    threshold = settings.drift_threshold
    drifts = drift(baseline, live, threshold) if baseline and live.jobs else []
    return VersionReport(
        model=model, version=version, promoted=version == promoted, live=live,
        baseline=baseline, baseline_source=source, drifts=tuple(drifts), threshold=threshold,
        enough_jobs=live.jobs >= min(window_jobs, MIN_JOBS),
        accuracy=read_accuracy(client, model, version),
        low_confidence=live.low_confidence(settings.low_confidence),
    )  # fmt: skip


def reports(client: redis.Redis, registry: Registry, settings: Settings,
            name: str | None = None) -> list[VersionReport]:  # fmt: skip
    """A report for each version of each model (or of ``name``) that answered jobs in the
    look-back, and each promoted one. A version that cannot be read (its manifest or baseline
    does not verify) is left out and logged, unless ``name`` asks for it."""
    found = []
    for model in [name] if name else registry.names():
        try:
            promoted: str | None = registry.promoted(model)
        except BatcheryError as exc:
            if name:
                raise
            log.warning("monitoring: %s", exc)
            promoted = None
        for version in registry.versions(model):
            if version != promoted and not read_window(client, model, version, 1).jobs:
                continue
            try:
                found.append(report(client, registry, settings, model, version, promoted))
            except BatcheryError as exc:
                if name:
                    raise
                log.warning("monitoring of %s@%s not read: %s", model, version, exc)
    return found
