"""``batchery monitor``: each served model version's live window against its baseline.

Reads only (producer.monitoring): the workers' per-minute counts, the version's baseline
(recorded beside its manifest, else its first live window), and feedback.
"""

from __future__ import annotations

from typing import Any

import redis

from producer.monitoring import (
    Profile,
    baseline_of,
    drift,
    read_accuracy,
    read_window,
)
from producer.registry import Registry
from producer.settings import Settings


def version_report(
    client: redis.Redis, registry: Registry, settings: Settings, name: str, version: str
) -> dict[str, Any]:
    """One version's monitoring, JSON-ready."""
    info = registry.get(name, version)
    window_jobs = settings.monitor_window_jobs
    live = read_window(client, name, version, window_jobs)
    recorded = registry.baseline(name, version)
    meta = {**info.meta, **({"baseline": recorded} if recorded else {})}
    baseline, source = baseline_of(client, meta, name, version, window_jobs)
    drifts = drift(baseline, live, settings.drift_threshold) if baseline and live.jobs else []
    enough = live.jobs >= min(window_jobs, MIN_JOBS)
    accuracy = read_accuracy(client, name, version)
    low = live.low_confidence(settings.low_confidence)
    return {
        "model": name,
        "version": version,
        "promoted": registry.promoted(name) == version,
        "jobs": live.jobs,
        "errors": live.counts.get("err", 0),
        "since": live.since,
        "low_confidence": low,
        "low_confidence_under": settings.low_confidence,
        "class_mix": _shares(live.distribution("c"), live.jobs),
        "baseline": {
            "source": source,
            "jobs": baseline.jobs if baseline else 0,
            "class_mix": _shares(baseline.distribution("c"), baseline.jobs) if baseline else {},
            "low_confidence": baseline.low_confidence(settings.low_confidence)
            if baseline
            else None,
        },
        "drift": [
            {
                "distribution": d.name,
                "distance": round(d.distance, 4),
                "threshold": d.threshold,
                "flagged": d.flagged and enough,
            }
            for d in drifts
        ],
        "drifted": enough and any(d.flagged for d in drifts),
        "enough_jobs": enough,
        "accuracy": {
            "jobs": accuracy.jobs,
            "rate": accuracy.rate,
            "interval95": accuracy.interval,
            "confusion": accuracy.confusion,
        },
    }


#: Fewest jobs in a window before drift is flagged: below it, sampling noise alone moves the
#: distances (shown, not flagged).
MIN_JOBS = 200


def collect(
    client: redis.Redis, registry: Registry, settings: Settings, name: str | None = None
) -> list[dict[str, Any]]:
    """A report for each version of each model (or of ``name``) that served jobs within the
    look-back, and each promoted one."""
    rows = []
    for model in [name] if name else registry.names():
        promoted = registry.promoted(model)
        for version in registry.versions(model):
            live = read_window(client, model, version, 1)
            if live.jobs or version == promoted:
                rows.append(version_report(client, registry, settings, model, version))
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The reports as text, one block a version."""
    out = []
    for row in rows:
        star = " (promoted)" if row["promoted"] else ""
        low = row["low_confidence"]
        base = row["baseline"]
        head = (f"{row['model']}@{row['version']}{star}: {row['jobs']} jobs in the window, "
                f"{row['errors']} failed")  # fmt: skip
        if low is not None:
            head += f", low confidence (top-1 < {row['low_confidence_under']:g}) {low:.1%}"
            if base["low_confidence"] is not None:
                head += f" (baseline {base['low_confidence']:.1%})"
        out.append(head)
        out.append(
            f"  baseline: {base['source']}" + (f", {base['jobs']} jobs" if base["jobs"] else "")
        )
        if row["class_mix"]:
            mix = "  ".join(f"{k} {v:.0%}" for k, v in sorted(row["class_mix"].items()))
            out.append(f"  class mix: {mix}")
        for d in row["drift"]:
            mark = "DRIFT" if d["flagged"] else ("ok" if row["enough_jobs"] else "(too few jobs)")
            out.append(f"  drift {d['distribution']:<13} {d['distance']:.3f} "
                       f"(threshold {d['threshold']:g})  {mark}")  # fmt: skip
        acc = row["accuracy"]
        if acc["jobs"]:
            lo, hi = acc["interval95"]
            out.append(f"  live accuracy {acc['rate']:.1%} of {acc['jobs']} with feedback "
                       f"(95% interval {lo:.1%} to {hi:.1%})")  # fmt: skip
            labels = sorted({*acc["confusion"], *(p for r in acc["confusion"].values() for p in r)})
            out.append("  true\\pred " + "".join(f"{p:>5}" for p in labels))
            for true in labels:
                cells = acc["confusion"].get(true, {})
                out.append(f"  {true:<9} " + "".join(f"{cells.get(p, 0):>5}" for p in labels))
        else:
            out.append("  live accuracy: no feedback yet (batchery feedback JOB_ID LABEL)")
    return "\n".join(out) if out else "no model version has served jobs in the last hour"


def _shares(counts: dict[str, int], total: int) -> dict[str, float]:
    return {k: v / total for k, v in counts.items()} if total else {}


__all__ = ["MIN_JOBS", "Profile", "collect", "render", "version_report"]
