"""gzip measure, TFLite conversion and the compression stage, on a tiny real model and data."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from cycleprune import compression, data, models, storage
from cycleprune.compat import keras
from cycleprune.config import CompressConfig, Config, ModelConfig

TINY_MODEL = ModelConfig(width=0.125, batch_norm=True)


def _prune_in_place(model, sparsity=0.5):
    """Wrap Conv2D/Dense in tfmot pruning, apply one masking step. Returns the wrapped model."""
    import tensorflow_model_optimization as tfmot

    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=1)

    def wrap(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    wrapped = keras.models.clone_model(model, clone_function=wrap)
    # lr 0: the weights stay as trained, only the masks change.
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (4, *model.input_shape[1:])).astype(np.float32)
    wrapped.fit(
        x,
        np.eye(2, dtype=np.float32)[[0, 1, 0, 1]],
        batch_size=4,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return wrapped


@pytest.fixture(scope="module")
def models_dir(tiny_dataset, tmp_path_factory, train_tiny_model):
    """dense.keras (trained), and pruned_wrapped.keras: the same weights, 50% pruned, wrapped."""
    folder = tmp_path_factory.mktemp("models")
    model = train_tiny_model(tiny_dataset)
    model.save(folder / "dense.keras")
    # clone_model(clone_function=...) wraps the original layers, so prune after saving dense.
    _prune_in_place(model).save(folder / "pruned_wrapped.keras")
    return folder


@pytest.fixture(scope="module")
def compressed(models_dir, tiny_dataset, tmp_path_factory, recording_split_reads):
    """run_compression on the wrapped pruned model, recording which splits it reads."""
    out = tmp_path_factory.mktemp("compress") / "out"
    config = Config(compress=CompressConfig(representative_samples=32))
    with recording_split_reads() as splits:
        sizes = compression.run_compression(
            str(models_dir / "pruned_wrapped.keras"), str(tiny_dataset), str(out), config
        )
    return out, sizes, splits


def test_gzip_size_of_a_file_is_gzip_level_9(tmp_path):
    payload = bytes(range(256)) * 100 + b"\0" * 50_000
    target = tmp_path / "blob.bin"
    target.write_bytes(payload)
    assert compression.gzip_size(target) == len(gzip.compress(payload, 9, mtime=0))


def test_gzip_size_of_a_folder_is_deterministic(tmp_path):
    def make(root, order, mtime):
        for name in order:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(name.encode() * 1000)
            os.utime(path, (mtime, mtime))
        return root

    first = make(tmp_path / "a", ["x.pb", "variables/v.data", "variables/v.index"], 1_000)
    second = make(tmp_path / "b", ["variables/v.index", "x.pb", "variables/v.data"], 2_000_000)
    assert compression.gzip_size(first) == compression.gzip_size(second)
    (second / "x.pb").write_bytes(os.urandom(4000))
    assert compression.gzip_size(second) > compression.gzip_size(first)
    with pytest.raises(FileNotFoundError, match="missing"):
        compression.gzip_size(tmp_path / "missing")


def test_pruned_model_gzips_smaller_than_dense(models_dir, tmp_path, capsys):
    dense = models.load_model(models_dir / "dense.keras")
    pruned = compression.strip_if_pruned(models.load_model(models_dir / "pruned_wrapped.keras"))
    assert compression.kernel_sparsity(dense)["sparsity"] < 0.01
    report = compression.kernel_sparsity(pruned)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(report["layer_sparsity"]) == {
        layer.name for layer in pruned.layers if isinstance(layer, keras.layers.Conv2D)
    } | {"predictions"}
    sizes = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save(tmp_path / f"{name}.keras")
        sizes[name] = (
            storage.tree_size(tmp_path / f"{name}.keras"),
            compression.gzip_size(tmp_path / f"{name}.keras"),
        )
    # Same number of stored weights, but the zeros compress away.
    assert sizes["pruned"][0] == pytest.approx(sizes["dense"][0], rel=0.01)
    assert sizes["pruned"][1] < 0.75 * sizes["dense"][1]
    with capsys.disabled():
        print(f"\n[gzip .keras] dense={sizes['dense'][1]} pruned={sizes['pruned'][1]} bytes")


def test_convert_tflite_rejects_bad_arguments(models_dir):
    model = models.load_model(models_dir / "dense.keras")
    with pytest.raises(ValueError, match="representative"):
        compression.convert_tflite(model, "int8")
    with pytest.raises(ValueError, match="representative"):
        compression.convert_tflite(model, "int8", np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="mode='int4'"):
        compression.convert_tflite(model, "int4")


def test_run_compression_writes_every_format(compressed):
    out, sizes, splits = compressed
    assert splits == ["train"]  # calibration never touches val or test
    assert sizes == storage.read_json(out / "sizes.json")
    assert sizes["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sizes["representative_samples"] == 32
    formats = [m["format"] for m in sizes["models"]]
    assert formats == [
        "keras",
        "saved_model",
        "tflite_float32",
        "tflite_dynamic",
        "tflite_int8",
    ]
    for entry in sizes["models"]:
        assert set(entry) >= {"name", "format", "path", "size_bytes", "gzip_bytes"}
        target = out / entry["path"]
        assert entry["size_bytes"] == storage.tree_size(target) > 0
        assert entry["gzip_bytes"] == compression.gzip_size(target)
        assert 0 < entry["gzip_bytes"] < entry["size_bytes"]
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert not list(out.parent.glob(".tmp-*"))
    by_format = {m["format"]: m for m in sizes["models"]}
    # Quantized weights are ~4x smaller than float32 ones.
    assert (
        by_format["tflite_dynamic"]["size_bytes"] < 0.5 * by_format["tflite_float32"]["size_bytes"]
    )
    assert by_format["tflite_int8"]["size_bytes"] < 0.5 * by_format["tflite_float32"]["size_bytes"]


def test_exported_keras_model_is_stripped(compressed):
    out, _, _ = compressed
    model = models.load_model(out / "model.keras")
    assert not any(type(layer).__name__ == "PruneLowMagnitude" for layer in model.layers)
    assert compression.kernel_sparsity(model)["sparsity"] == pytest.approx(0.5, abs=0.01)


def _run_litert(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    values = interpreter.get_tensor(out["index"]).astype(np.float32)
    if out["dtype"] == np.uint8:
        scale, zero_point = out["quantization"]
        values = (values - zero_point) * scale
    return inp, values


def test_tflite_variants_agree_with_keras(compressed, tiny_dataset):
    out, _, _ = compressed
    images, _ = data.load_arrays(tiny_dataset, "val")
    images = images[:48]
    model = models.load_model(out / "model.keras")
    expected = model(images.astype(np.float32), training=False).numpy()
    assert np.ptp(expected[:, 1]) > 0.05  # a model with opinions, or argmax checks are vacuous

    inp, got = _run_litert(out / "model_float32.tflite", images)
    assert inp["dtype"] == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)

    inp, got = _run_litert(out / "model_dynamic.tflite", images)
    assert inp["dtype"] == np.float32
    # int8 weights, activations quantized per batch on the fly: close, not equal.
    assert np.mean(np.abs(got - expected)) < 0.03
    assert np.max(np.abs(got - expected)) < 0.25
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9

    inp, got = _run_litert(out / "model_int8.tflite", images)
    assert inp["dtype"] == np.uint8
    assert inp["quantization"] == (1.0, 0)  # raw pixels in
    assert np.mean(np.abs(got - expected)) < 0.05
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.9


def test_run_compression_leaves_old_output_on_failure(models_dir, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sizes.json").write_text("{}")
    config = Config(compress=CompressConfig(quantizations=("float32",), saved_model=False))

    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compression, "convert_tflite", broken)
        with pytest.raises(RuntimeError, match="converter crashed"):
            compression.run_compression(
                str(models_dir / "dense.keras"), str(tiny_dataset), str(out), config
            )
    assert sorted(p.name for p in out.iterdir()) == ["sizes.json"]
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(FileNotFoundError):
        compression.run_compression(
            str(tmp_path / "nope.keras"), str(tiny_dataset), str(out), config
        )
