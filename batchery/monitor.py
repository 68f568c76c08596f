"""``batchery monitor``: each served model version's live window against its baseline.

Reads only (producer.monitoring): the workers' per-minute counts, the version's baseline
(recorded beside its manifest, else its first live window), and feedback.
"""

from __future__ import annotations

from typing import Any

import redis

from producer.monitoring import MIN_JOBS, VersionReport, reports
from producer.registry import Registry
from producer.settings import Settings


def as_json(found: VersionReport, low_under: float) -> dict[str, Any]:
    """One version's report, JSON-ready (``batchery monitor --json``); ``low_under``: the
    top-1 score under which an answer counts as low confidence."""
    live, baseline, accuracy = found.live, found.baseline, found.accuracy
    compared, agreed = live.counts.get("compared", 0), live.counts.get("agree", 0)
    worked = live.jobs + live.counts.get("err", 0)
    return {
        "model": found.model,
        "version": found.version,
        "promoted": found.promoted,
        "jobs": live.jobs,
        "errors": live.counts.get("err", 0),
        "since": live.since,
        "low_confidence": found.low_confidence,
        "low_confidence_under": low_under,
        "class_mix": _shares(live.distribution("c"), live.jobs),
        # A shadow's or canary's answers compared with the served version's on the same jobs.
        "agreement": {"compared": compared, "rate": agreed / compared if compared else None},
        "ms_per_job": live.counts.get("us", 0) / worked / 1000 if worked else None,
        "baseline": {
            "source": found.baseline_source,
            "jobs": baseline.jobs if baseline else 0,
            "class_mix": _shares(baseline.distribution("c"), baseline.jobs) if baseline else {},
            "low_confidence": baseline.low_confidence(low_under) if baseline else None,
        },
        "drift": [
            {
                "distribution": d.name,
                "distance": round(d.distance, 4),
                "threshold": d.threshold,
                "flagged": d.flagged and found.enough_jobs,
            }
            for d in found.drifts
        ],
        "drifted": found.drifted,
        "enough_jobs": found.enough_jobs,
        "accuracy": {
            "jobs": accuracy.jobs,
            "rate": accuracy.rate,
            "interval95": accuracy.interval,
            "confusion": accuracy.confusion,
        },
    }


def collect(
    client: redis.Redis, registry: Registry, settings: Settings, name: str | None = None
) -> list[dict[str, Any]]:
    """``batchery monitor``'s rows: each version that answered jobs in the look-back, and
    each promoted one (producer.monitoring.reports)."""
    return [as_json(found, settings.low_confidence)
            for found in reports(client, registry, settings, name)]  # fmt: skip


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
        agreement = row["agreement"]
        if agreement["compared"]:
            out.append(f"  agreement with the served version {agreement['rate']:.1%} of "
                       f"{agreement['compared']} jobs")  # fmt: skip
        if row["ms_per_job"] is not None:
            out.append(f"  work {row['ms_per_job']:.3f} ms a job (decode, forward pass)")
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


__all__ = ["MIN_JOBS", "as_json", "collect", "render"]
