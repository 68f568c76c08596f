import json
from pathlib import Path

import pytest

from producer.errors import ModelNotFoundError
from producer.registry import ModelInfo, Registry, sha256_of

ROOT = Path(__file__).resolve().parents[2]


def publish(reg: Registry, tmp_path: Path, name: str = "m", content: bytes = b"w") -> ModelInfo:
    src = tmp_path / "model.keras"
    src.write_bytes(content)
    return reg.publish(src, name, ["a", "b"], (28, 28, 1))


def test_first_version_is_promoted_later_ones_wait(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    first = publish(reg, tmp_path, content=b"one")
    second = publish(reg, tmp_path, content=b"two")
    assert (first.version, second.version) == ("1", "2")
    assert reg.promoted("m") == "1"
    assert reg.get("m").version == "1"
    reg.promote("m", "2")
    assert reg.get("m").version == "2"


def test_metadata_records_what_loading_needs(tmp_path: Path) -> None:
    info = publish(Registry(tmp_path / "models"), tmp_path)
    meta = json.loads((info.path / "model.json").read_text())
    assert meta["sha256"] == sha256_of(info.file)
    assert info.labels == ["a", "b"] and info.input_shape == (28, 28, 1)
    assert info.color_mode == "L" and info.scale == pytest.approx(1 / 255)


def test_unknown_model_and_version_name_what_exists(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    publish(reg, tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'x'.*models: m"):
        reg.get("x")
    with pytest.raises(ModelNotFoundError, match=r"no version '9' \(versions: 1\)"):
        reg.get("m", "9")


def test_versions_sort_as_numbers(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    for _ in range(11):
        publish(reg, tmp_path)
    assert reg.versions("m")[-2:] == ["10", "11"]


def test_shipped_default_model_is_intact() -> None:
    info = Registry(ROOT / "models").get("mnist-cnn")
    assert info.meta["sha256"] == sha256_of(info.file)
    assert info.labels == [str(d) for d in range(10)]
    assert info.meta["metrics"]["test_images"] == 1000
