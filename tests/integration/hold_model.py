"""A real model that holds a batch mid-forward-pass on demand: the shipped CNN behind a
``Lambda`` layer (Python code: publishable only with ``--trust``).

In a worker process whose environment names a folder in :data:`HOLD_ENV`, a forward pass
that starts while ``<folder>/hold`` exists writes the number of images it holds to
``<folder>/held`` (atomically) and waits there until ``hold`` is deleted; then it goes on as
the shipped model does. Without that variable, or without the file, it is the shipped model
(one ``getenv`` a pass more). So a test can catch one chosen worker inside a batch: after
the batch read Redis for its jobs' earlier answers, before it stores its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.integration.trap_model import LABELS, shipped_behind

__all__ = ["HOLD_ENV", "LABELS", "Hold", "build"]

#: The environment variable naming a worker's hold folder.
HOLD_ENV = "BATCHERY_TEST_HOLD"

# A lambda, not a def: Keras stores a lambda's code in the file (a def only by name, which
# the worker could not import); every name it uses is imported in it for the same reason.
# The code runs in the worker, as a trusted model's may.
HOLD = lambda x: __import__("tensorflow").ensure_shape(  # noqa: E731
    __import__("tensorflow").numpy_function(
        lambda a: (
            lambda folder: (
                a
                if not folder or not __import__("os").path.exists(folder + "/hold")
                else (
                    __import__("pathlib").Path(folder + "/held.tmp").write_text(str(len(a))),
                    __import__("os").replace(folder + "/held.tmp", folder + "/held"),
                    [__import__("time").sleep(0.02) for _ in iter(
                        lambda: __import__("os").path.exists(folder + "/hold"), False)],
                    a,
                )[-1]
            )
        )(__import__("os").environ.get("BATCHERY_TEST_HOLD")),
        [x], "float32", stateful=True,
    ),
    [None, 28, 28, 1],
)  # fmt: skip


def build(path: Path) -> Path:
    """Write the hold model to ``path`` (a ``.keras`` file)."""
    return shipped_behind(HOLD, path)


class Hold:
    """The test's end of one worker's hold folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    @property
    def env(self) -> dict[str, str]:
        """The worker's environment entry that makes its forward passes obey this hold."""
        return {HOLD_ENV: str(self.folder)}

    def catch(self, timeout: float) -> int:
        """Hold the worker's next forward pass; wait until one is held and return its
        image count."""
        (self.folder / "hold").touch()
        held = self.folder / "held"
        deadline = time.monotonic() + timeout
        while not held.exists():
            assert time.monotonic() < deadline, f"no forward pass held after {timeout:g} s"
            time.sleep(0.01)
        return int(held.read_text())

    def release(self) -> None:
        """Let the held forward pass go on (and the next ones run freely)."""
        os.unlink(self.folder / "hold")
