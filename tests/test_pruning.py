"""cycleprune.pruning: wrapping, schedules, strip, m:n structure, checkpoint rule, end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cycleprune.compat import keras, tf
from cycleprune.config import ModelConfig, PruneConfig, preset

STEPS = 8  # ceil(240 tiny training images / batch 32)
SMOKE_MODEL = ModelConfig(width=0.125, batch_norm=True)


def _model(seed: int = 0):
    from cycleprune import models

    return models.build_model(SMOKE_MODEL, (28, 28, 1), 2, seed=seed)


@pytest.fixture(scope="module")
def batch(tiny_dataset):
    from cycleprune import data

    images, labels = data.load_arrays(tiny_dataset, "train")
    return images[:32].astype(np.float32), np.eye(2, dtype=np.float32)[labels[:32]]


def _fine_tune(model, batch, steps: int = 2):
    """A few optimizer steps with tfmot's step callback (as run_pruning does, minus the rest)."""
    import tensorflow_model_optimization as tfmot

    x, y = batch
    model.compile(keras.optimizers.SGD(1e-3), keras.losses.CategoricalCrossentropy())
    model.fit(
        x,
        y,
        batch_size=len(x) // steps,
        epochs=1,
        verbose=0,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
    )
    return model


def _wrapped_names(model) -> set[str]:
    from cycleprune.pruning import _wrappers

    return {w.layer.name for w in _wrappers(model)}


def test_scheduled_sparsity_closed_form_values():
    from cycleprune.pruning import scheduled_sparsity

    # Polynomial 0 -> 0.5 over steps 0..4 (2 epochs of 2 steps): s(u) = 0.5 * (1 - (1 - u/4)**3).
    ramp = PruneConfig(final_sparsity=0.5, begin_epoch=0, end_epoch=2, epochs=3, frequency=1)
    expected = [0.2890625, 0.4375, 0.4921875, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(scheduled_sparsity(6, ramp, steps_per_epoch=2), expected)
    # Every 2nd step: masks change at u = 2 and 4 only.
    every2 = dataclasses.replace(ramp, frequency=2)
    np.testing.assert_allclose(
        scheduled_sparsity(6, every2, steps_per_epoch=2), [0, 0.4375, 0.4375, 0.5, 0.5, 0.5]
    )
    # A frequency that does not divide the ramp never reaches the target.
    every3 = dataclasses.replace(ramp, frequency=3)
    assert scheduled_sparsity(6, every3, steps_per_epoch=2)[-1] == pytest.approx(0.4921875)
    # Constant from epoch 1 (step 2), every 2 steps; override of the target.
    constant = PruneConfig(schedule="constant", begin_epoch=1, end_epoch=2, epochs=2, frequency=2)
    np.testing.assert_allclose(
        scheduled_sparsity(5, constant, steps_per_epoch=2, final_sparsity=0.75),
        [0, 0.75, 0.75, 0.75, 0.75],
    )
    with pytest.raises(ValueError, match=r"final_sparsity=1\.0"):
        scheduled_sparsity(5, constant, steps_per_epoch=2, final_sparsity=1.0)


def test_prune_model_wraps_only_conv_and_dense_of_a_copy():
    from cycleprune.pruning import _wrappers, prune_model

    model = _model()
    before = [w.copy() for w in model.get_weights()]
    pruned = prune_model(model, PruneConfig(), steps_per_epoch=STEPS)
    prunable = {
        layer.name
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    }
    assert len(prunable) == 14 and _wrapped_names(pruned) == prunable
    assert isinstance(pruned.get_layer("rescale"), keras.layers.Rescaling)
    assert isinstance(pruned.get_layer("block1_bn1"), keras.layers.BatchNormalization)
    assert not _wrappers(model)
    kernel = pruned.get_layer("prune_low_magnitude_block2_conv1").layer.kernel
    assert kernel is not model.get_layer("block2_conv1").kernel  # its own weights...
    np.testing.assert_array_equal(kernel.numpy(), model.get_layer("block2_conv1").kernel.numpy())
    for old, new in zip(before, model.get_weights(), strict=True):  # ...and the input untouched
        np.testing.assert_array_equal(old, new)


def test_min_weights_leaves_small_layers_dense(batch):
    from cycleprune.pruning import expected_sparsity, prune_model

    model = _model()
    pruned = prune_model(model, PruneConfig(min_weights=1000), steps_per_epoch=STEPS)
    sizes = {
        layer.name: int(np.prod(layer.kernel.shape))
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    }
    small = {name for name, size in sizes.items() if size < 1000}
    assert small and small != set(sizes)  # the smoke model has both kinds
    assert _wrapped_names(pruned) == set(sizes) - small
    big = sum(size for name, size in sizes.items() if name not in small)
    assert expected_sparsity(pruned, 0.5) == pytest.approx(0.5 * big / sum(sizes.values()))
    _fine_tune(pruned, batch)  # still trains with the small layers unwrapped


def test_zero_sparsity_is_a_no_op(batch):
    from cycleprune.pruning import overall_sparsity, prune_model, sparsity_report, strip

    model = _model()
    config = PruneConfig(final_sparsity=0.0, initial_sparsity=0.0, frequency=1)
    stripped = strip(prune_model(model, config, steps_per_epoch=STEPS))
    x, _ = batch
    np.testing.assert_array_equal(stripped.predict(x, verbose=0), model.predict(x, verbose=0))
    for old, new in zip(model.get_weights(), stripped.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    # Fine-tuning with a zero target updates the masks every step and still zeroes nothing.
    tuned = _fine_tune(prune_model(model, config, steps_per_epoch=STEPS), batch)
    assert set(sparsity_report(tuned).values()) == {0.0}
    assert overall_sparsity(strip(tuned)) == 0.0


def test_pruned_layers_reach_the_target_and_strip_keeps_outputs(batch):
    from cycleprune.pruning import overall_sparsity, prune_model, sparsity_report, strip

    config = PruneConfig(schedule="constant", final_sparsity=0.5, begin_epoch=0, frequency=1)
    wrapped = _fine_tune(prune_model(_model(), config, steps_per_epoch=STEPS), batch)
    report = sparsity_report(wrapped)
    assert len(report) == 14
    for name, value in report.items():
        assert value == pytest.approx(0.5, abs=0.01), name
    x, _ = batch
    expected = wrapped.predict(x, verbose=0)
    stripped = strip(wrapped)
    assert not _wrapped_names(stripped)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert sparsity_report(stripped) == report
    assert overall_sparsity(stripped) == pytest.approx(0.5, abs=0.01)


def _is_m_by_n(kernel: np.ndarray, m: int, n: int) -> bool:
    """At least m zeros in every n consecutive input channels (the kernel's axis -2)."""
    rows = np.moveaxis(kernel, -2, -1).reshape(-1, kernel.shape[-2])
    groups = rows.reshape(rows.shape[0], -1, n)
    return bool(((groups == 0).sum(axis=-1) >= m).all())


def test_two_by_four_skips_the_grayscale_first_conv(batch, caplog):
    from cycleprune.pruning import expected_sparsity, prune_model, sparsity_report, strip

    with caplog.at_level(logging.INFO, logger="cycleprune.pruning"):
        pruned = prune_model(_model(), PruneConfig(m_by_n="2:4"), steps_per_epoch=STEPS)
    assert any("block1_conv1" in r.getMessage() and "2:4" in r.getMessage() for r in caplog.records)
    names = _wrapped_names(pruned)
    assert "block1_conv1" not in names and len(names) == 13
    stripped = strip(_fine_tune(pruned, batch))
    for layer in stripped.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel = layer.kernel.numpy()
            if layer.name == "block1_conv1":
                assert not (kernel == 0).any()
            else:
                assert _is_m_by_n(kernel, 2, 4), layer.name
                assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01)
    sizes = {name: v for name, v in sparsity_report(stripped).items()}
    assert sizes["block1_conv1"] == 0.0
    total = sum(layer.kernel.numpy().size for layer in stripped.layers if hasattr(layer, "kernel"))
    first = stripped.get_layer("block1_conv1").kernel.numpy().size
    assert expected_sparsity(pruned, 0.9, "2:4") == pytest.approx(0.5 * (total - first) / total)
    assert not _is_m_by_n(np.ones((3, 3, 4, 2)), 2, 4)  # the checker itself can fail


def _entry(epoch, sparsity, val_auc, val_accuracy=0.8):
    return {
        "epoch": epoch,
        "sparsity": sparsity,
        "val_auc": val_auc,
        "val_accuracy": val_accuracy,
        "checkpoint": f"ckpt-{epoch}",
    }


def test_select_checkpoint_rule():
    from cycleprune.pruning import select_checkpoint

    entries = [_entry(1, 0.30, 0.99), _entry(2, 0.49, 0.85), _entry(3, 0.50, 0.80)]
    best = select_checkpoint(entries, target=0.5)
    assert best["epoch"] == 2 and best["reached_target"] is True  # epoch 1: off target
    assert "reached_target" not in entries[1]  # a copy, inputs untouched
    ties = [_entry(1, 0.5, 0.9, 0.7), _entry(2, 0.5, 0.9, 0.8), _entry(3, 0.5, 0.9, 0.75)]
    assert select_checkpoint(ties, 0.5)["epoch"] == 2  # val_accuracy breaks the AUC tie
    same = [_entry(1, 0.5, 0.9), _entry(2, 0.5, 0.9)]
    assert select_checkpoint(same, 0.5)["epoch"] == 2  # then the later epoch
    nan = [_entry(1, 0.5, math.nan, 0.99), _entry(2, 0.5, 0.6, 0.5)]
    assert select_checkpoint(nan, 0.5)["epoch"] == 2
    short = [_entry(1, 0.2, 0.95), _entry(2, 0.3, 0.9)]
    fallback = select_checkpoint(short, 0.5)
    assert fallback["epoch"] == 2 and fallback["reached_target"] is False
    assert select_checkpoint(short, 0.31, tolerance=0.02)["epoch"] == 2
    assert select_checkpoint(short, 0.25, tolerance=0.05)["epoch"] == 1
    with pytest.raises(ValueError, match="at least one"):
        select_checkpoint([], 0.5)
    with pytest.raises(ValueError, match=r"target=1\.5"):
        select_checkpoint(short, 1.5)


def test_run_pruning_end_to_end(tiny_dataset, tmp_path):
    from tensorflow.core.util import event_pb2

    from cycleprune import models, pruning, training

    base = tmp_path / "base.keras"
    training.save_model(_model(), base)
    smoke = preset("smoke")
    prune = PruneConfig(
        final_sparsity=0.5, begin_epoch=0, end_epoch=1, epochs=2, frequency=2, lr_scale=0.5
    )
    config = smoke.replace(prune=prune)
    out = tmp_path / "pruned"
    result = pruning.run_pruning(base, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)

    assert {p.name for p in out.iterdir()} == {
        "model.keras",
        "history.json",
        "sparsity.json",
        "tensorboard",
        "checkpoints",
    }
    report = json.loads((out / "sparsity.json").read_text())
    assert report["target"] == 0.5
    assert report["overall"] == pytest.approx(0.5, abs=0.01) == result.sparsity
    assert len(report["layers"]) == 14 and report["layers"] == result.layer_sparsity
    for name, value in report["layers"].items():
        assert value == pytest.approx(0.5, abs=0.01), name
    best = report["best_checkpoint"]
    assert best["reached_target"] is True and best["epoch"] in (1, 2)
    assert best["sparsity"] == pytest.approx(0.5, abs=0.01) and report["warnings"] == []
    assert best == result.best_checkpoint
    # Named within the checkpoint folder, not by a path into a working copy.
    assert best["checkpoint"] == f"ckpt-{best['epoch']}"
    assert (out / "checkpoints" / f"{best['checkpoint']}.index").is_file()

    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    # prune.lr_scale scales both CLR bounds of the fine-tuning.
    assert (history["min_lr"], history["max_lr"]) == pytest.approx((5e-4, 5e-3))
    assert len(history["sparsity"]) == 2 * STEPS == history["global_step"]
    assert history["sparsity"][0] == 0.0 and history["sparsity"][STEPS - 1] == 0.5
    assert history["epochs"][0]["sparsity"] == pytest.approx(
        history["sparsity"][STEPS - 1], abs=0.01
    )

    loaded = models.load_model(out / "model.keras")
    assert not _wrapped_names(loaded)
    assert pruning.overall_sparsity(loaded) == pytest.approx(result.sparsity)
    x = np.zeros((2, 28, 28, 1), np.float32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-5)

    # A second call resumes from the last checkpoint: nothing to train, the same choice.
    again = pruning.run_pruning(base, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)
    assert again.history["epochs"] == history["epochs"]
    assert again.best_checkpoint == result.best_checkpoint
    assert again.sparsity == result.sparsity
    # The same model in a file with other bytes (Keras writes the save time into it, so a rerun
    # of the training stage gives one) resumes too.
    resaved = tmp_path / "resaved.keras"
    with zipfile.ZipFile(base) as source, zipfile.ZipFile(resaved, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            info.date_time = (2030, 1, 1, 0, 0, 0)
            target.writestr(info, data)
    assert resaved.read_bytes() != Path(base).read_bytes()
    resumed = pruning.run_pruning(resaved, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)
    assert resumed.history["epochs"] == history["epochs"]
    # Another model into the same folder: its checkpoints would replace the new model's weights
    # (and, the run being finished, the old pruned model would come back as the new one's).
    other = tmp_path / "other.keras"
    training.save_model(_model(seed=7), other)
    with pytest.raises(ValueError, match=r"checkpoints of a run with model_sha256="):
        pruning.run_pruning(other, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)
    # Settings that shape every step but live in no checkpoint: the loss, the input's.
    for message, overrides in [
        ("checkpoints of a run with loss.label_smoothing=", ["train.label_smoothing=0.2"]),
        ("checkpoints of a run with data.class_weight=", ["data.class_weight=none"]),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            pruning.run_pruning(
                base, tiny_dataset, out, config.override(overrides), min_lr=1e-3, max_lr=1e-2
            )

    tags = set()
    for path in (out / "tensorboard" / "train").glob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            tags.update(v.tag for v in event_pb2.Event.FromString(record.numpy()).summary.value)
    assert {"epoch_loss", "epoch_sparsity", "epoch_layer_sparsity/block2_conv1"} <= tags


@pytest.mark.parametrize("per_call", [1, 4])
def test_run_pruning_resumes_after_sigterm_with_the_pruning_step_where_it_was(
    tiny_dataset, tmp_path, monkeypatch, per_call
):
    import os
    import signal

    from cycleprune import models, preemption, pruning, training

    base = tmp_path / "base.keras"
    training.save_model(_model(), base)
    prune = PruneConfig(final_sparsity=0.5, begin_epoch=0, end_epoch=2, epochs=2, frequency=1)
    smoke = preset("smoke")

    def steps_per_call(n):
        return smoke.replace(
            prune=prune, train=dataclasses.replace(smoke.train, steps_per_execution=n)
        )

    # The reference runs one step per call; tfmot counts its pruning step in the graph, so
    # several steps per call must prune and train the same (per_call=4).
    straight = pruning.run_pruning(
        base, tiny_dataset, tmp_path / "straight", steps_per_call(1), min_lr=1e-3, max_lr=1e-2
    )
    config = steps_per_call(per_call)

    class SigtermAtStep(training._StopIfRequested):
        def on_train_batch_begin(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == STEPS:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(training, "_StopIfRequested", SigtermAtStep)
        with pytest.raises(preemption.PreemptedError) as caught:
            pruning.run_pruning(base, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)
    reader = tf.train.load_checkpoint(caught.value.checkpoint)
    steps = {
        int(reader.get_tensor(k))
        for k in reader.get_variable_to_shape_map()
        if "pruning_step" in k and "OPTIMIZER" not in k
    }
    assert caught.value.step == STEPS + per_call  # stopped after the call in progress
    assert steps == {STEPS + per_call}  # tfmot's step is saved with the model, with the optimizer

    resumed = pruning.run_pruning(base, tiny_dataset, out, config, min_lr=1e-3, max_lr=1e-2)
    assert resumed.history["global_step"] == straight.history["global_step"] == 2 * STEPS
    assert (
        resumed.sparsity == straight.sparsity and resumed.layer_sparsity == straight.layer_sparsity
    )
    for ours, theirs in zip(resumed.history["epochs"], straight.history["epochs"], strict=True):
        ours.pop("resumed_at_step", None)
        assert ours.pop("layer_sparsity") == theirs.pop("layer_sparsity")
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for a, b in zip(
        models.load_model(resumed.model_path).get_weights(),
        models.load_model(straight.model_path).get_weights(),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_resnet_prunes_strips_and_converts_to_tflite(batch, tmp_path):
    # The residual network's Add layers and 1x1 shortcuts go through the same chain as the VGG:
    # wrapping, fine-tuning, strip, TFLite (dynamic and full-integer).
    from cycleprune import compression, evaluation, models
    from cycleprune.pruning import overall_sparsity, prune_model, sparsity_report, strip

    config = ModelConfig(arch="resnet", width=0.125, batch_norm=True)
    model = models.build_model(config, (28, 28, 1), 2, seed=0)
    prune = PruneConfig(final_sparsity=0.5, begin_epoch=0, end_epoch=1, frequency=1)
    tuned = _fine_tune(prune_model(model, prune, steps_per_epoch=2), batch)
    layers = sparsity_report(tuned)
    assert "stage2_block1_shortcut" in layers and len(layers) == 21  # every conv and the head
    assert all(v == pytest.approx(0.5, abs=0.02) for v in layers.values()), layers
    stripped = strip(tuned)
    assert overall_sparsity(stripped) == pytest.approx(0.5, abs=0.02)
    x, _ = batch
    expected = stripped.predict(x, verbose=0)
    for mode, tolerance in (("dynamic", 0.05), ("int8", 0.1)):
        path = tmp_path / f"{mode}.tflite"
        path.write_bytes(compression.convert_tflite(stripped, mode, representative=x[:16]))
        got = evaluation.predict_proba(path, x)
        assert np.abs(got - expected).max() < tolerance, mode
