"""``python -m bench.explain``: how faithful the explanations are, as a chart and a grid.

On the 1,000 test digits and the promoted model: the deletion curve (the predicted class's
mean probability as 0 to 50% of the pixels are set to background, in attribution order
and at random among the ink pixels), and 10 test digits beside their heatmaps.
Writes ``docs/explain-deletion.png`` and ``docs/explain-grid.png`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


def deletion_curves(model: Any, x: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean probability of the predicted class after deleting each fraction of pixels."""
    probs = model.predict(x)
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(x))
    maps = np.concatenate([model.explain(x[i : i + 250], predicted[i : i + 250].astype(np.int32))
                           for i in range(0, len(x), 250)])  # fmt: skip
    order = np.argsort(-maps.reshape(len(x), -1), axis=1)
    flat = x.reshape(len(x), -1)
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(np.flatnonzero(row > 0)) for row in flat]
    attributed, random = [], []
    for fraction in FRACTIONS:
        k = int(fraction * flat.shape[1])
        by_order = flat.copy()
        np.put_along_axis(by_order, order[:, :k], 0.0, axis=1)
        at_random = flat.copy()
        for i, ink in enumerate(shuffled):
            at_random[i, ink[:k]] = 0.0
        attributed.append(float(model.predict(by_order.reshape(x.shape))[rows, predicted].mean()))
        random.append(float(model.predict(at_random.reshape(x.shape))[rows, predicted].mean()))
    return attributed, random


def main(argv: list[str] | None = None) -> int:
    """Draw both figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from producer.registry import Registry
    from worker.explain import heatmap
    from worker.models import load
    from worker.train import mnist_split

    info = Registry(ROOT / "models").get("mnist-cnn")
    model = load(info, 64)
    _, _, images, labels = mnist_split()
    x = (images[..., None] / 255.0).astype(np.float32)
    attributed, random = deletion_curves(model, x)
    percent = [100 * f for f in FRACTIONS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(percent, attributed, "o-", label="highest attribution first (Integrated Gradients)")
    ax.plot(percent, random, "s--", label="random ink pixels")
    ax.set_xlabel("pixels set to background (%)")
    ax.set_ylabel("mean probability of the predicted class")
    ax.set_title(f"deletion test, {info.key}, 1,000 test digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "explain-deletion.png", dpi=110)
    for f, a, r in zip(FRACTIONS, attributed, random, strict=True):
        print(f"{100 * f:4.0f}%  attribution order {a:.3f}  random ink {r:.3f}")

    picks = [int(np.flatnonzero(labels == digit)[0]) for digit in range(10)]
    probs = model.predict(x[picks])
    assert model.explain is not None
    maps = model.explain(x[picks], probs.argmax(axis=1).astype(np.int32))
    fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
    for col, (i, attribution) in enumerate(zip(picks, maps, strict=True)):
        axes[0, col].imshow(images[i], cmap="gray")
        axes[0, col].set_title(f"{probs[col].argmax()} ({probs[col].max():.2f})", fontsize=8)
        axes[1, col].imshow(heatmap(attribution), cmap="inferno")
        for row in (0, 1):
            axes[row, col].axis("off")
    fig.suptitle("10 test digits (label, score) and their Integrated Gradients heatmaps",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(args.out / "explain-grid.png", dpi=110)
    print(f"wrote {args.out / 'explain-deletion.png'} and {args.out / 'explain-grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
