"""`batchery train` and `batchery models ...` on a throwaway registry: real TensorFlow, no Redis."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
from PIL import Image

from batchery.cli import main
from producer.client import Client
from producer.errors import ModelLoadError, ModelNotFoundError
from producer.registry import Registry, sha256_of
from producer.settings import Settings
from tests.factories import digit_paths
from worker.models import ModelCache, load, tensorflow
from worker.train import TRAIN_PER_CLASS, mnist_split

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labeled split: 60 training and 20 test digits a class, as DATA_DIR/<label>/."""
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = mnist_split()
    for part, xs, ys, per_class in (("train", x_train, y_train, 60), ("test", x_test, y_test, 20)):
        for label in range(10):
            folder = root / part / str(label)
            folder.mkdir(parents=True)
            for i in np.flatnonzero(ys == label)[:per_class]:
                Image.fromarray(xs[i], mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("BATCHERY_MODEL_DIR", str(tmp_path / "models"))
    return Registry(tmp_path / "models")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_split_is_fixed_and_disjoint() -> None:
    x_train, y_train, x_test, _ = mnist_split()
    assert x_train.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert np.bincount(y_train).tolist() == [TRAIN_PER_CLASS] * 10
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)


def test_train_publishes_a_version_well_above_chance(digits, registry, capsys) -> None:
    code, out, _ = cli(
        capsys, "train", str(digits / "train"), "--name", "tiny", "--epochs", "8",
        "--seed", "1", "--test-dir", str(digits / "test"),
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["name"], report["version"]) == ("tiny", "1")
    assert report["metrics"]["test_accuracy"] > 0.6  # chance is 0.1
    info = registry.get("tiny")
    assert info.meta["training"]["images"] == 600 and info.meta["metrics"]["test_images"] == 200


def test_publish_promote_list_evaluate(digits, registry, capsys) -> None:
    for _ in range(2):
        code, out, err = cli(
            capsys, "models", "publish", str(SHIPPED), "--name", "digits", "--labels",
            ",".join(map(str, range(10))),
        )  # fmt: skip
        assert code == 0, err
    assert "published digits@2" in out and "promoted" not in out
    rows = json.loads(cli(capsys, "models", "list", "--json")[1])
    assert [(r["name"], r["version"], r["promoted"]) for r in rows] == [
        ("digits", "1", True),
        ("digits", "2", False),
    ]
    assert all(len(r["sha256"]) == 64 for r in rows)

    assert cli(capsys, "models", "promote", "digits", "2")[0] == 0
    rows = json.loads(cli(capsys, "models", "list", "--json")[1])
    assert [r["promoted"] for r in rows] == [False, True]

    code, out, _ = cli(capsys, "models", "evaluate", "digits@1", str(digits / "test"))
    assert code == 0
    assert out.startswith("digits@1: accuracy ") and "true\\pred" in out
    code, out, _ = cli(capsys, "models", "evaluate", "digits", str(digits / "test"), "--json")
    result = json.loads(out)
    assert result["model"] == "digits@2" and result["images"] == 200
    assert result["accuracy"] >= 0.9 and np.trace(result["confusion"]) == round(
        result["accuracy"] * 200
    )


def test_labels_from_a_file_and_a_count_mismatch(registry, capsys, tmp_path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"digit-{d}" for d in range(10)) + "\n")
    code, _, err = cli(
        capsys, "models", "publish", str(SHIPPED), "--name", "d", "--labels", str(labels)
    )
    assert code == 0, err
    assert registry.get("d").labels[3] == "digit-3"
    code, _, err = cli(capsys, "models", "publish", str(SHIPPED), "--name", "d", "--labels", "a,b")
    assert code == 1 and "10 outputs but 2 labels" in err


def test_a_version_publishes_with_a_batch_budget_of_its_own(registry, capsys) -> None:
    labels = ",".join(str(d) for d in range(10))
    args = ("models", "publish", str(SHIPPED), "--name", "b", "--labels", labels)
    code, _, err = cli(capsys, *args, "--batch-budget-ms", "200")
    assert code == 0, err
    assert registry.get("b").meta["batch_budget_ms"] == 200.0
    code, _, err = cli(capsys, *args, "--batch-budget-ms", "0")
    assert code == 1 and "positive number" in err
    code, _, err = cli(capsys, *args)
    assert code == 0 and "batch_budget_ms" not in registry.get("b", "2").meta


def lambda_model(path: Path) -> Path:
    tf = tensorflow()
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((28, 28, 1)),
            tf.keras.layers.Lambda(lambda x: x * 2.0),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.save(path)
    return path


def test_a_lambda_layer_is_refused_unless_trusted(registry, capsys, tmp_path) -> None:
    file = lambda_model(tmp_path / "lambda.keras")
    args = ("models", "publish", str(file), "--name", "lam", "--labels", "0,1,2,3,4,5,6,7,8,9")
    code, _, err = cli(capsys, *args)
    assert code == 1 and "Lambda layer" in err and "--trust" in err
    assert registry.names() == []
    code, _, err = cli(capsys, *args, "--trust")
    assert code == 0, err
    info = registry.get("lam")
    assert info.trusted
    assert load(info, batch_size=4).predict(np.zeros((3, 28, 28, 1), np.float32)).shape == (3, 10)


def test_legacy_h5_needs_trust(registry, capsys, tmp_path) -> None:
    tf = tensorflow()
    h5 = tmp_path / "model.h5"
    tf.keras.models.load_model(SHIPPED).save(h5)
    args = ("models", "publish", str(h5), "--name", "seed", "--labels", "0,1,2,3,4,5,6,7,8,9")
    code, _, err = cli(capsys, *args)
    assert code == 1 and "legacy .h5" in err
    assert cli(capsys, *args, "--trust")[0] == 0
    assert registry.get("seed").format == "h5"


def test_a_savedmodel_folder_publishes_and_serves(registry, capsys, tmp_path) -> None:
    tf = tensorflow()
    keras_model = tf.keras.models.load_model(SHIPPED)
    keras_model.export(tmp_path / "exported", verbose=False)
    args = ("models", "publish", str(tmp_path / "exported"), "--name", "sm", "--labels",
            "0,1,2,3,4,5,6,7,8,9")  # fmt: skip
    # A SavedModel's graph can't be checked for code: like .h5, it needs --trust.
    code, _, err = cli(capsys, *args)
    assert code == 1 and "SavedModel" in err and "--trust" in err
    code, _, err = cli(capsys, *args, "--trust")
    assert code == 0, err
    info = registry.get("sm")
    assert info.format == "savedmodel" and info.input_shape == (28, 28, 1)
    x = np.random.default_rng(0).random((5, 28, 28, 1), np.float32)
    np.testing.assert_allclose(load(info, 8).predict(x), keras_model(x).numpy(), atol=1e-5)
    # A manifest edited to drop the trust flag is refused at load.
    untrusted = replace(info, meta={**info.meta, "trusted": False})
    with pytest.raises(ModelLoadError, match="SavedModel"):
        load(untrusted, 8)


def test_a_tampered_model_file_is_refused(tmp_path) -> None:
    reg = Registry(tmp_path / "models")
    info = reg.publish(SHIPPED, "m", [str(d) for d in range(10)], (28, 28, 1))
    with info.file.open("r+b") as fh:
        fh.seek(-100, 2)
        fh.write(b"\0" * 10)
    with pytest.raises(ModelLoadError, match=r"sha256 .* refusing to load"):
        load(reg.get("m"), batch_size=4)


def shipped_registry(tmp_path: Path, versions: int) -> Registry:
    reg = Registry(tmp_path / "models")
    for _ in range(versions):
        reg.publish(SHIPPED, "mnist-cnn", [str(d) for d in range(10)], (28, 28, 1))
    return reg


def test_cache_keeps_at_most_k_models_least_recently_used_out(tmp_path) -> None:
    cache = ModelCache(shipped_registry(tmp_path, 3), "mnist-cnn", 8, threads=1, max_loaded=2)
    for version in ("1", "2", "1", "3"):
        cache.get(None, version)
    assert cache.loaded_keys() == ["mnist-cnn@1", "mnist-cnn@3"]


def test_promotion_switches_only_after_the_new_version_is_loaded(tmp_path) -> None:
    reg = shipped_registry(tmp_path, 2)
    cache = ModelCache(reg, "mnist-cnn", 8, threads=1)
    assert cache.get(None, None).info.version == "1"
    reg.promote("mnist-cnn", "2")
    assert cache.resolve(None, None).version == "1"  # not until the watcher has loaded it
    cache.refresh()
    assert "mnist-cnn@2" in cache.loaded_keys()
    assert cache.get(None, None).info.version == "2"


def test_producer_refuses_unknown_models_when_it_sees_the_registry(tmp_path) -> None:
    reg = shipped_registry(tmp_path, 1)
    fake = fakeredis.FakeRedis()
    client = Client(settings=Settings(model_dir=reg.root), redis_client=fake)
    image = digit_paths(1)[0]
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'resnet'.*models: mnist-cnn"):
        client.submit(image, model="resnet")
    with pytest.raises(ModelNotFoundError, match=r"no version '5' \(versions: 1\)"):
        client.submit(image, version="5")
    assert fake.llen("batchery") == 0
    client.submit(image, model="mnist-cnn", version="1")
    # A producer that can't see the registry leaves the check to the worker.
    blind = Client(settings=Settings(model_dir=tmp_path / "absent"), redis_client=fake)
    blind.submit(image, model="resnet")
    assert fake.llen("batchery") == 2


def test_shipped_default_model_meets_its_accuracy_on_the_test_digits() -> None:
    _, _, x_test, y_test = mnist_split()
    info = Registry(ROOT / "models").get("mnist-cnn")
    model = load(info, batch_size=256)
    probs = model.predict(x_test[..., None].astype(np.float32) * np.float32(info.scale))
    accuracy = float((probs.argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.97, accuracy


def test_shipped_model_is_exactly_the_reference_architecture_plus_dropout() -> None:
    model = tensorflow().keras.models.load_model(SHIPPED, compile=False)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense", "Dropout", "Dense"]
    conv, dense, out = model.layers[0], model.layers[4], model.layers[6]
    assert (conv.filters, conv.kernel_size) == (32, (3, 3))
    assert (dense.units, out.units) == (64, 10)


def test_a_file_swapped_after_the_check_is_never_loaded(tmp_path, monkeypatch) -> None:
    """The worker hashes and loads one private copy: swapping the registry's file between
    the check and the load changes nothing."""
    import shutil as real_shutil

    from worker import models as models_module

    reg = Registry(tmp_path / "models")
    info = reg.publish(SHIPPED, "m", [str(d) for d in range(10)], (28, 28, 1))
    loaded_from: list[Path] = []
    copyfile, read_model = real_shutil.copyfile, models_module.read_model

    def copy_then_swap(src: Any, dst: Any) -> Any:
        out = copyfile(src, dst)
        Path(src).write_bytes(b"swapped after the copy was taken")
        return out

    def recording_read_model(path: Path, *args: Any) -> Any:
        loaded_from.append(path)
        assert (path.parent.stat().st_mode & 0o077) == 0  # a private folder
        return read_model(path, *args)

    monkeypatch.setattr(models_module.shutil, "copyfile", copy_then_swap)
    monkeypatch.setattr(models_module, "read_model", recording_read_model)
    model = load(info, 8)
    assert loaded_from and loaded_from[0] != info.file
    assert model.predict(np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 10)
    monkeypatch.undo()
    with pytest.raises(ModelLoadError, match="sha256"):
        load(info, 8)  # the swapped file itself is refused


def test_folder_hashes_frame_each_file(tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a").write_bytes(b"bX")
    (two / "ab").write_bytes(b"X")
    assert sha256_of(one) != sha256_of(two)
    (one / "link").symlink_to("/etc/passwd")
    with pytest.raises(ModelLoadError, match="symlink"):
        sha256_of(one)


def test_publishing_is_atomic_and_racing_publishers_get_versions_of_their_own(tmp_path) -> None:
    import threading

    reg = Registry(tmp_path / "models")
    labels = [str(d) for d in range(10)]
    threads = [
        threading.Thread(target=reg.publish, args=(SHIPPED, "m", labels, (28, 28, 1)))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reg.versions("m") == ["1", "2", "3", "4", "5", "6"]
    for version in reg.versions("m"):
        info = reg.get("m", version)
        assert info.meta["version"] == version and sha256_of(info.file) == info.meta["sha256"]
    assert reg.promoted("m") == "1"
    assert not [p for p in (reg.root / "m").iterdir() if p.name.startswith(".")]
