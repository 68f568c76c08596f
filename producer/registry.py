"""The model registry: a directory of ``<name>/<version>/`` folders, readable without TensorFlow.

Each version folder holds the model file and ``model.json`` (labels, input shape, color
mode, normalization, sha256 of the file, creation time, training summary, metrics). A
``PROMOTED`` file in ``<name>/`` names the version served when a job names no version; without
it the highest version is served. Loading the model itself is the worker's business
(``worker.models``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from producer.errors import ModelNotFoundError
from producer.wire import check_name

META_FILE = "model.json"
PROMOTED_FILE = "PROMOTED"


@dataclass(frozen=True)
class ModelInfo:
    """One version of one model, as the registry describes it."""

    name: str
    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def file(self) -> Path:
        """The model file (or SavedModel directory) inside the version folder."""
        return self.path / self.meta["file"]

    @property
    def labels(self) -> list[str]:
        """Class labels, in the order of the model's outputs."""
        return [str(label) for label in self.meta["labels"]]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Height, width, channels the model takes."""
        h, w, c = self.meta["input_shape"]
        return int(h), int(w), int(c)

    @property
    def color_mode(self) -> str:
        """The Pillow mode inputs are converted to: ``L`` (grayscale) or ``RGB``."""
        return str(self.meta.get("color_mode", "L"))

    @property
    def scale(self) -> float:
        """Pixels in 0..255 are multiplied by this, then ``offset`` is added."""
        return float(self.meta.get("normalization", {}).get("scale", 1.0 / 255.0))

    @property
    def offset(self) -> float:
        """Added to scaled pixels (e.g. -1.0 for models trained on [-1, 1])."""
        return float(self.meta.get("normalization", {}).get("offset", 0.0))

    @classmethod
    def from_dir(cls, path: Path) -> ModelInfo:
        """The model in a version folder outside any registry (``batchery worker --model``)."""
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ModelNotFoundError(
                f"{path}: no {META_FILE} here (expected a model version folder)"
            )
        meta = json.loads(meta_file.read_text())
        return cls(name=str(meta["name"]), version=str(meta["version"]), path=path, meta=meta)

    @property
    def format(self) -> str:
        """``keras``, ``h5`` or ``savedmodel``."""
        return str(self.meta.get("format", "keras"))

    @property
    def trusted(self) -> bool:
        """Published with ``--trust``: loaded without Keras safe_mode."""
        return bool(self.meta.get("trusted", False))

    @property
    def key(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"


class Registry:
    """Read and write the model registry rooted at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Model names that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """A model's versions, oldest first."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if (p / META_FILE).is_file() and p.name.isdigit()]
        return sorted(found, key=int)

    def promoted(self, name: str) -> str:
        """The version served when a job names none."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(self._unknown_model(name))
        pointer = self.root / name / PROMOTED_FILE
        if pointer.is_file():
            version = pointer.read_text().strip()
            if version in versions:
                return version
        return versions[-1]

    def get(self, name: str, version: str | None = None) -> ModelInfo:
        """The version asked for (the promoted one when ``version`` is None)."""
        if name not in self.names():
            raise ModelNotFoundError(self._unknown_model(name))
        version = version or self.promoted(name)
        if version not in self.versions(name):
            have = ", ".join(self.versions(name))
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r} (versions: {have})"
            )
        info = ModelInfo.from_dir(self.root / name / version)
        return replace(info, name=name, version=version)

    def promote(self, name: str, version: str) -> None:
        """Make ``version`` the one served by default; atomic for readers."""
        self.get(check_name("model", name) or name, check_name("version", version))
        tmp = self.root / name / f".{PROMOTED_FILE}.tmp"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, self.root / name / PROMOTED_FILE)

    def publish(
        self,
        source: Path,
        name: str,
        labels: Sequence[str],
        input_shape: Sequence[int],
        color_mode: str = "L",
        scale: float = 1.0 / 255.0,
        offset: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> ModelInfo:
        """Copy a model file in as the next version of ``name``; the first version is promoted."""
        check_name("model", name)
        versions = self.versions(name)
        version = str(int(versions[-1]) + 1) if versions else "1"
        path = self.root / name / version
        path.mkdir(parents=True, exist_ok=False)
        target = path / Path(source).name
        if Path(source).is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        meta: dict[str, Any] = {
            "name": name,
            "version": version,
            "file": target.name,
            "sha256": sha256_of(target),
            "labels": [str(label) for label in labels],
            "input_shape": [int(n) for n in input_shape],
            "color_mode": color_mode,
            "normalization": {"scale": scale, "offset": offset},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if not versions:
            self.promote(name, version)
        return ModelInfo(name=name, version=version, path=path, meta=meta)

    def _unknown_model(self, name: str) -> str:
        have = ", ".join(self.names()) or "none"
        return f"unknown model {name!r} in {self.root} (models: {have})"


def sha256_of(path: Path) -> str:
    """The sha256 of a file, or of a directory's files in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
