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
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from producer.errors import ModelLoadError, ModelNotFoundError, PromotionRefusedError
from producer.wire import check_name

META_FILE = "model.json"
#: Beside ``model.json`` when the registry is signed: its signature (see producer.signing).
SIGNATURE_FILE = "model.json.sig"
PROMOTED_FILE = "PROMOTED"
#: Beside ``PROMOTED``: the model's shadow and canary (producer.rollout), JSON on the first
#: line and, when the registry is signed, its signature on the second.
ROLLOUT_FILE = "ROLLOUT"
#: Beside ``model.json``: the version's monitoring baseline (producer.monitoring), JSON on
#: the first line and, when the registry is signed, its signature on the second. A file of
#: its own, written atomically: recording a baseline never rewrites a manifest workers read.
BASELINE_FILE = "baseline.json"
#: How far below its source an optimised version may score and still be promoted.
MAX_ACCURACY_DROP = 0.01


class ManifestSigner(Protocol):
    """Signs manifest bytes in a context (``producer.signing.ManifestKey``)."""

    def sign(self, context: str, data: bytes) -> str:
        """A one-line signature."""
        ...


class ManifestChecker(Protocol):
    """Checks manifest signatures (``producer.signing.ManifestVerifier``)."""

    def verify(self, context: str, data: bytes, signature: str | None, what: str) -> None:
        """Raise ModelLoadError unless the signature verifies."""
        ...


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
    def from_dir(cls, path: Path, verifier: ManifestChecker | None = None) -> ModelInfo:
        """The model in a version folder outside any registry (``batchery worker --model``)."""
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise ModelNotFoundError(
                f"{path}: no {META_FILE} here (expected a model version folder)"
            )
        raw = meta_file.read_bytes()
        meta = json.loads(raw)
        name, version = str(meta["name"]), str(meta["version"])
        if verifier is not None:
            verifier.verify(_meta_context(name, version), raw, _signature_of(path),
                            f"{path / META_FILE}")  # fmt: skip
        return cls(name=name, version=version, path=path, meta=meta)

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
    """Read and write the model registry rooted at ``root``.

    With a ``key``, what it writes (``model.json``, ``PROMOTED``) is signed; with a
    ``verifier``, it reads only manifests whose signature verifies (a worker's registry,
    when message signing is set up). Build it from settings with :meth:`from_settings`.
    """

    def __init__(
        self,
        root: Path,
        key: ManifestSigner | None = None,
        verifier: ManifestChecker | None = None,
    ) -> None:
        self.root = Path(root)
        self.key = key
        self.verifier = verifier

    @classmethod
    def from_settings(cls, settings: Any) -> Registry:
        """``BATCHERY_MODEL_DIR``, signing and checking manifests when signing is set up."""
        from producer.signing import ManifestKey, ManifestVerifier

        return cls(settings.model_dir, ManifestKey.from_settings(settings),
                   ManifestVerifier.from_settings(settings))  # fmt: skip

    def names(self) -> list[str]:
        """Model names that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready object per version: its manifest, name, version and whether it is
        promoted (``batchery models list --json``, ``GET /v1/models``)."""
        rows: list[dict[str, Any]] = []
        for name in self.names():
            promoted = self.promoted(name)
            for version in self.versions(name):
                meta = self.get(name, version).meta
                rows.append({**meta, "name": name, "version": version,
                             "promoted": version == promoted})  # fmt: skip
        return rows

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
        if not pointer.is_file():
            if self.verifier is not None:
                raise ModelLoadError(f"{name}: no signed {PROMOTED_FILE} (batchery models promote)")
            return versions[-1]
        # The version on the first line; its signature, when signed, on the second.
        version, _, signature = pointer.read_text().partition("\n")
        version = version.strip()
        if self.verifier is not None:
            self.verifier.verify(_promoted_context(name), version.encode(),
                                 signature.strip() or None, f"{name}/{PROMOTED_FILE}")  # fmt: skip
        return version if version in versions else versions[-1]

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
        path = self.root / name / version
        raw = (path / META_FILE).read_bytes()
        if self.verifier is not None:
            self.verifier.verify(_meta_context(name, version), raw, _signature_of(path),
                                 f"{name}@{version} {META_FILE}")  # fmt: skip
        return ModelInfo(name=name, version=version, path=path, meta=json.loads(raw))

    def promote(self, name: str, version: str, force: bool = False) -> None:
        """Make ``version`` the one served by default; atomic for readers (a new file
        renamed over the old one: a worker reads the old version or the new, never half).

        An optimised version whose recorded accuracy is more than
        :data:`MAX_ACCURACY_DROP` below its source's is refused unless ``force``.
        """
        info = self.get(check_name("model", name) or name, check_name("version", version))
        record = info.meta.get("optimized") or {}
        accuracy, source = record.get("accuracy"), record.get("source_accuracy")
        if (
            not force
            and accuracy is not None
            and source is not None
            and float(accuracy) < float(source) - MAX_ACCURACY_DROP
        ):
            raise PromotionRefusedError(
                f"{info.key} ({record.get('method')}) scored {float(accuracy):.1%} on "
                f"{record.get('test_dir')}, its source version {record.get('source_version')} "
                f"{float(source):.1%}: more than {MAX_ACCURACY_DROP:.0%} below; promote it "
                "with --force if that is what you want"
            )
        content = f"{version}\n"
        if self.key is not None:
            content += self.key.sign(_promoted_context(name), version.encode()) + "\n"
        _write_atomically(self.root / name / PROMOTED_FILE, content.encode())

    def sign(self, name: str, version: str | None = None) -> list[str]:
        """Sign manifests already in the registry (all of NAME's versions, or one) and its
        ``PROMOTED``: who runs this vouches for them. Returns the versions signed."""
        if self.key is None:
            from producer.errors import ConfigError

            raise ConfigError("signing a manifest needs BATCHERY_SIGNING_KEY and _CERT set")
        versions = [version] if version else self.versions(name)
        for v in versions:
            path = self.root / name / v
            raw = (path / META_FILE).read_bytes()
            signature = self.key.sign(_meta_context(name, v), raw)
            _write_atomically(path / SIGNATURE_FILE, f"{signature}\n".encode())
        if (self.root / name / PROMOTED_FILE).is_file():
            self.promote(name, self.promoted(name))
        return versions

    def rollout(self, name: str) -> dict[str, Any] | None:
        """``name``'s rollout settings, None if none; checked when verifying (a rollout
        unsigned on a signed registry raises, and workers then serve without it)."""
        file = self.root / name / ROLLOUT_FILE
        if not file.is_file():
            return None
        raw, _, signature = file.read_text().partition("\n")
        if self.verifier is not None:
            self.verifier.verify(_rollout_context(name), raw.encode(), signature.strip() or None,
                                 f"{name}/{ROLLOUT_FILE}")  # fmt: skip
        found: dict[str, Any] = json.loads(raw)
        return found or None

    def set_rollout(self, name: str, rollout: dict[str, Any] | None) -> None:
        """Write (or, with None, end) ``name``'s rollout; its versions must verify. Signed
        when keyed; refused on a signed registry without the key."""
        if self.verifier is not None and self.key is None:
            from producer.errors import ConfigError

            raise ConfigError(
                "this registry is signed: a canary or shadow needs BATCHERY_SIGNING_KEY and "
                "_CERT, like promote (rolling back does not: batchery models canary NAME --off "
                "on a host without the key sets the switch in Redis)"
            )
        for field_name in ("shadow", "canary"):
            version = (rollout or {}).get(field_name)
            if version is not None:
                self.get(name, str(version))  # unknown or unverified: raises
        raw = json.dumps(rollout or {}, sort_keys=True)
        content = raw + "\n"
        if self.key is not None:
            content += self.key.sign(_rollout_context(name), raw.encode()) + "\n"
        (self.root / name).mkdir(parents=True, exist_ok=True)
        _write_atomically(self.root / name / ROLLOUT_FILE, content.encode())

    def record_baseline(self, name: str, version: str, baseline: dict[str, Any]) -> None:
        """Keep ``baseline`` beside ``name@version``'s manifest (signed when keyed)."""
        info = self.get(name, version)
        raw = json.dumps(baseline, sort_keys=True)
        content = raw + "\n"
        if self.key is not None:
            content += self.key.sign(_baseline_context(name, info.version), raw.encode()) + "\n"
        _write_atomically(info.path / BASELINE_FILE, content.encode())

    def baseline(self, name: str, version: str) -> dict[str, Any] | None:
        """``name@version``'s recorded baseline, None if it has none; checked when verifying."""
        info = self.get(name, version)
        file = info.path / BASELINE_FILE
        if not file.is_file():
            return None
        raw, _, signature = file.read_text().partition("\n")
        if self.verifier is not None:
            what = f"{info.key} {BASELINE_FILE}"
            context = _baseline_context(name, info.version)
            self.verifier.verify(context, raw.encode(), signature.strip() or None, what)
        found: dict[str, Any] = json.loads(raw)
        return found

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
        """Copy a model file in as the next version of ``name``; the first version is promoted.

        Atomic: the version is written in a hidden folder beside the others, then renamed to
        its number, so a worker never sees half a version (and two publishers racing get two
        versions, never one mixed from both).
        """
        check_name("model", name)
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=folder))
        try:
            target = staging / Path(source).name
            if Path(source).is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            digest = sha256_of(target)
            staging.chmod(0o755)
            while True:
                versions = self.versions(name)
                version = str(int(versions[-1]) + 1) if versions else "1"
                meta = self._meta(name, version, target.name, digest, labels, input_shape,
                                  color_mode, scale, offset, extra)  # fmt: skip
                raw = (json.dumps(meta, indent=2) + "\n").encode()
                (staging / META_FILE).write_bytes(raw)
                if self.key is not None:  # in the same folder, renamed with it: atomic too
                    signature = self.key.sign(_meta_context(name, version), raw)
                    (staging / SIGNATURE_FILE).write_text(signature + "\n")
                try:
                    os.rename(staging, folder / version)  # fails if the number was taken
                    break
                except OSError:
                    if not (folder / version).exists():
                        raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        path = folder / version
        if not versions:
            self.promote(name, version)
        return ModelInfo(name=name, version=version, path=path, meta=meta)

    @staticmethod
    def _meta(
        name: str, version: str, file: str, digest: str, labels: Sequence[str],
        input_shape: Sequence[int], color_mode: str, scale: float, offset: float,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:  # fmt: skip
        return {
            "name": name,
            "version": version,
            "file": file,
            "sha256": digest,
            "labels": [str(label) for label in labels],
            "input_shape": [int(n) for n in input_shape],
            "color_mode": color_mode,
            "normalization": {"scale": scale, "offset": offset},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
        }

    def _unknown_model(self, name: str) -> str:
        have = ", ".join(self.names()) or "none"
        return f"unknown model {name!r} in {self.root} (models: {have})"


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, or of a folder's files framed one by one.

    A folder's digest takes, for each regular file in sorted order, its relative path and
    its length before its bytes: two different folders can't hash alike (a file ``a``
    holding ``bX`` and a file ``ab`` holding ``X`` do not). A symlink in a folder is refused:
    it could point anywhere after the hash.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        _hash_file(digest, path)
        return digest.hexdigest()
    for file in sorted(path.rglob("*")):
        if file.is_symlink():
            raise ModelLoadError(f"{file}: a symlink inside a model folder is not allowed")
        if not file.is_file():
            continue
        rel = file.relative_to(path).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "big") + rel)
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        _hash_file(digest, file)
    return digest.hexdigest()


def _hash_file(digest: Any, file: Path) -> None:
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _meta_context(name: str, version: str) -> str:
    return f"{name}/{version}/{META_FILE}"


def _rollout_context(name: str) -> str:
    return f"{name}/{ROLLOUT_FILE}"


def _baseline_context(name: str, version: str) -> str:
    return f"{name}/{version}/{BASELINE_FILE}"


def _promoted_context(name: str) -> str:
    return f"{name}/{PROMOTED_FILE}"


def _signature_of(path: Path) -> str | None:
    file = path / SIGNATURE_FILE
    return file.read_text().strip() if file.is_file() else None
