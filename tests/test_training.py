"""cycleprune.training: CLR training, checkpoints and resume, divergence, history, outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cycleprune.compat import keras, tf
from cycleprune.config import ScheduleConfig, TrainConfig, preset

MIN_LR, MAX_LR = 1e-3, 1e-1
STEPS = 8  # ceil(240 tiny training images / batch 32)


def _config(epochs: int, **train):
    config = preset("smoke")
    train.setdefault("steps_per_execution", 1)  # the reference: Python between every step
    # A half cycle of 1.5 epochs: a restarted step counter would give a different LR.
    return config.replace(
        train=dataclasses.replace(config.train, epochs=epochs, whole_cycles=False, **train),
        schedule=dataclasses.replace(config.schedule, step_size_epochs=1.5),
    )


def _clr(steps, config, min_lr=MIN_LR, max_lr=MAX_LR):
    from cycleprune import schedules

    step_size = schedules.clr_step_size(STEPS, config.schedule.step_size_epochs)
    return schedules.clr(
        steps, min_lr, max_lr, step_size, config.schedule.policy, config.schedule.gamma
    )


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorflow.core.util import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor)))
                )
    return scalars


@pytest.fixture(scope="module")
def two_epochs(tiny_dataset, tmp_path_factory):
    from cycleprune import training

    out = tmp_path_factory.mktemp("train2")
    config = _config(2)
    result = training.run_training(tiny_dataset, out, config, min_lr=MIN_LR, max_lr=MAX_LR)
    return out, config, result


def test_resolve_lr_bounds_order_and_errors():
    from cycleprune.training import resolve_lr_bounds

    configured = ScheduleConfig(min_lr=0.01, max_lr=0.2)
    assert resolve_lr_bounds(configured, 1e-4, 1e-2) == (1e-4, 1e-2)
    assert resolve_lr_bounds(configured) == (0.01, 0.2)
    with pytest.raises(ValueError, match="LR range test"):
        resolve_lr_bounds(ScheduleConfig())
    with pytest.raises(ValueError, match="both"):
        resolve_lr_bounds(configured, min_lr=1e-3)
    with pytest.raises(ValueError, match=r"max_lr=0\.001"):
        resolve_lr_bounds(ScheduleConfig(), 1e-2, 1e-3)


def test_training_epochs_rounds_up_to_whole_cycles():
    from cycleprune.training import training_epochs

    schedule = ScheduleConfig(step_size_epochs=1.0)  # one cycle = 2 epochs
    assert training_epochs(TrainConfig(epochs=3, whole_cycles=True), schedule) == 4
    assert training_epochs(TrainConfig(epochs=3, whole_cycles=False), schedule) == 3
    assert training_epochs(TrainConfig(epochs=4, whole_cycles=True), schedule) == 4


def test_positive_class_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    from cycleprune.training import PositiveClassAUC

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * labels + rng.uniform(0, 0.7, 200), 0, 1).astype(np.float32)
    metric = PositiveClassAUC(class_id=1, num_thresholds=2000)
    metric.update_state(np.eye(2, dtype=np.float32)[labels], np.stack([1 - p1, p1], axis=1))
    assert float(metric.result()) == pytest.approx(roc_auc_score(labels, p1), abs=1e-3)


def test_finite_loss_equals_inner_loss_and_rejects_nan():
    from cycleprune.losses import CategoricalFocalLoss
    from cycleprune.training import FiniteLoss

    y = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    p = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    inner = CategoricalFocalLoss()
    assert float(FiniteLoss(inner)(y, p)) == pytest.approx(float(inner(y, p)), rel=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite loss"):
        FiniteLoss(inner)(y, np.array([[np.nan, 1.0], [0.5, 0.5]], np.float32))


def _tiny(n: int, batch: int) -> tf.data.Dataset:
    """``n`` two-feature examples of alternating classes, in batches."""
    labels = np.eye(2, dtype=np.float32)[[i % 2 for i in range(n)]]
    return tf.data.Dataset.from_tensor_slices((np.zeros((n, 2), np.float32), labels)).batch(batch)


def _fit_tiny(ds, checkpoint_dir, *, steps_per_epoch, val_ds=None, **kwargs):
    """``training.fit`` of a one-layer model on ``ds`` for one epoch."""
    from cycleprune import training

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    return training.fit(
        model,
        ds,
        val_ds,
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.CategoricalCrossentropy(),
        epochs=1,
        steps_per_epoch=steps_per_epoch,
        checkpoint_dir=checkpoint_dir,
        **kwargs,
    )


def test_fit_rejects_steps_that_disagree_with_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="steps_per_epoch=3"):
        _fit_tiny(_tiny(10, 5), tmp_path, steps_per_epoch=3)


def test_run_training_writes_model_history_and_tensorboard(two_epochs):
    from cycleprune import models

    out, config, result = two_epochs
    assert {p.name for p in out.iterdir()} == {
        "model.keras",
        "history.json",
        "tensorboard",
        "checkpoints",
    }
    assert not list(out.glob(".tmp-*"))
    assert result.epochs_run == 2
    assert result.global_step == 2 * STEPS
    assert (result.min_lr, result.max_lr) == (MIN_LR, MAX_LR)

    history = json.loads((out / "history.json").read_text())
    assert history == json.loads(json.dumps(result.history))
    assert history["steps_per_epoch"] == STEPS and history["num_epochs"] == 2
    assert history["step_size"] == 12  # 1.5 epochs of 8 steps
    np.testing.assert_allclose(history["lr"], _clr(np.arange(2 * STEPS), config), rtol=1e-12)
    epochs = history["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert [e["global_step"] for e in epochs] == [STEPS, 2 * STEPS]
    for entry in epochs:
        for key in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"):
            assert math.isfinite(entry[key]), key
        # The LR the optimizer really used at the epoch's last step is the closed form's value.
        assert entry["lr"] == pytest.approx(float(_clr(entry["global_step"] - 1, config)), rel=1e-6)
    assert result.val_metrics["auc"] == epochs[-1]["val_auc"]
    assert result.val_metrics["accuracy"] == epochs[-1]["val_accuracy"]

    model = models.load_model(out / "model.keras")
    probs = model.predict(np.zeros((3, 28, 28, 1), np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    ckpt = out / "checkpoints"
    assert tf.train.latest_checkpoint(str(ckpt)).endswith("ckpt-2")
    assert json.loads((ckpt / "ckpt-2.json").read_text())["val_auc"] == epochs[1]["val_auc"]

    train_scalars = _events(out / "tensorboard" / "train")
    val_scalars = _events(out / "tensorboard" / "validation")
    assert [s for s, _ in train_scalars["epoch_loss"]] == [0, 1]
    assert [v for _, v in train_scalars["epoch_lr"]] == pytest.approx([e["lr"] for e in epochs])
    assert [v for _, v in val_scalars["epoch_auc"]] == pytest.approx([e["val_auc"] for e in epochs])


def test_resume_continues_the_schedule_at_the_saved_step(two_epochs, tiny_dataset, tmp_path):
    from cycleprune import training

    first_out, _, first = two_epochs
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    config = _config(3)

    resumed = training.run_training(
        tiny_dataset,
        tmp_path / "resumed",
        config,
        min_lr=MIN_LR,
        max_lr=MAX_LR,
        checkpoint_dir=checkpoints,
    )
    assert resumed.epochs_run == 1
    assert resumed.global_step == 3 * STEPS
    epochs = resumed.history["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[:2] == first.history["epochs"]  # merged from the saved entries
    assert epochs[2]["global_step"] == 3 * STEPS
    # The restored step counter drives the in-graph schedule: LR of step 3*STEPS-1, not STEPS-1.
    assert epochs[2]["lr"] == pytest.approx(float(_clr(3 * STEPS - 1, config)), rel=1e-6)
    assert epochs[2]["lr"] != pytest.approx(float(_clr(STEPS - 1, config)), rel=1e-3)
    reader = tf.train.load_checkpoint(str(checkpoints / "ckpt-3"))
    iterations = [k for k in reader.get_variable_to_shape_map() if "iter" in k]
    assert [int(reader.get_tensor(k)) for k in iterations] == [3 * STEPS]

    again = training.run_training(
        tiny_dataset,
        tmp_path / "again",
        config,
        min_lr=MIN_LR,
        max_lr=MAX_LR,
        checkpoint_dir=checkpoints,
    )
    assert again.epochs_run == 0 and again.global_step == 3 * STEPS
    assert again.history["epochs"] == epochs

    straight = training.run_training(
        tiny_dataset, tmp_path / "straight", config, min_lr=MIN_LR, max_lr=MAX_LR
    )
    assert straight.epochs_run == 3
    assert straight.global_step == resumed.global_step
    np.testing.assert_allclose(straight.history["lr"], resumed.history["lr"])


def test_resume_refuses_checkpoints_written_under_other_settings(
    two_epochs, tiny_dataset, tmp_path, caplog
):
    from cycleprune import training

    first_out, config, _ = two_epochs
    stored = json.loads((first_out / "checkpoints" / training.RUN_KEY_FILE).read_text())
    assert stored["steps_per_epoch"] == STEPS
    assert stored["optimizer"]["learning_rate"]["config"]["max_lr"] == MAX_LR
    assert len(stored["dataset"]) == 12
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    before = sorted(p.name for p in checkpoints.iterdir())
    # Other CLR bounds: the restored steps followed the old schedule (and, the run being
    # finished, nothing would train while history.json reported the new one).
    with pytest.raises(
        ValueError,
        match=r"checkpoints of a run with optimizer\.learning_rate\.config\.max_lr=0\.1, but "
        r"this run has optimizer\.learning_rate\.config\.max_lr=0\.5 .*new checkpoint folder",
    ):
        training.run_training(
            tiny_dataset,
            tmp_path / "o1",
            config,
            min_lr=MIN_LR,
            max_lr=0.5,
            checkpoint_dir=checkpoints,
        )
    cases = [
        # Another batch size: another number of steps per epoch.
        ("steps_per_epoch=8, but this run has steps_per_epoch=", ["data.batch_size=8"]),
        # Settings no checkpoint holds: the model's BatchNorm momentum, the input's augmentation.
        ("checkpoints of a run with model.bn_momentum=", ["model.bn_momentum=0.5"]),
        ("checkpoints of a run with data.augment=", [f"data.augment={not config.data.augment}"]),
        # The loss and its settings: the restored steps minimised another objective.
        ("checkpoints of a run with loss.class=", ["train.loss=crossentropy"]),
        ("checkpoints of a run with loss.label_smoothing=", ["train.label_smoothing=0.3"]),
    ]
    for message, overrides in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            training.run_training(
                tiny_dataset,
                tmp_path / "o2",
                config.override(overrides),
                min_lr=MIN_LR,
                max_lr=MAX_LR,
                checkpoint_dir=checkpoints,
            )
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing written
    # A key an older cycleprune wrote, without the settings recorded since, still resumes (as
    # checkpoints with no run.json at all do), with a warning naming them (here the loss); a
    # setting that had one value then is compared with it (BatchNorm momentum 0.99).
    older = {k: v for k, v in stored.items() if k != "loss"}
    older["model"] = {k: v for k, v in stored["model"].items() if k not in ("arch", "bn_momentum")}
    (checkpoints / training.RUN_KEY_FILE).write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING, logger="cycleprune.training"):
        resumed = training.run_training(
            tiny_dataset,
            tmp_path / "o3",
            config,
            min_lr=MIN_LR,
            max_lr=MAX_LR,
            checkpoint_dir=checkpoints,
        )
    assert resumed.epochs_run == 0  # finished: nothing to train, no error
    assert "did not record loss: resuming without comparing them" in caplog.text
    assert config.model.bn_momentum == 0.99 and config.model.arch == "vgg"
    with pytest.raises(ValueError, match=r"a run with model\.bn_momentum=0\.99, but this run has"):
        training.run_training(
            tiny_dataset,
            tmp_path / "o4",
            config.override(["model.bn_momentum=0.5"]),
            min_lr=MIN_LR,
            max_lr=MAX_LR,
            checkpoint_dir=checkpoints,
        )
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_divergence_stops_with_step_and_lr(tiny_dataset, tmp_path):
    from cycleprune import training

    base = _config(2, loss="crossentropy")
    config = base.replace(model=dataclasses.replace(base.model, batch_norm=False))
    with pytest.raises(training.DivergenceError) as caught:
        training.run_training(tiny_dataset, tmp_path / "out", config, min_lr=1e3, max_lr=1e4)
    err = caught.value
    # The presets' 16 steps per call (a whole 8-step epoch per call here) stop at the same step.
    looped = config.replace(train=dataclasses.replace(config.train, steps_per_execution=16))
    with pytest.raises(training.DivergenceError) as in_loop:
        training.run_training(tiny_dataset, tmp_path / "loop", looped, min_lr=1e3, max_lr=1e4)
    assert in_loop.value.step == err.step and in_loop.value.lr == err.lr
    assert not (tmp_path / "loop" / "model.keras").exists()
    assert 0 <= err.step < 2 * STEPS
    assert err.lr == pytest.approx(float(_clr(err.step, config, 1e3, 1e4)), rel=1e-5)
    assert f"step {err.step}" in str(err) and f"{err.lr:.6g}" in str(err)
    assert err.checkpoint is None and "none" in str(err)
    assert not (tmp_path / "out" / "model.keras").exists()
    assert not (tmp_path / "out" / "history.json").exists()


def test_divergence_names_the_last_good_checkpoint(two_epochs, tiny_dataset, tmp_path):
    from cycleprune import training

    first_out, _, _ = two_epochs
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    # Checkpoints of an earlier version (no run.json) resume under any settings: here, absurd
    # CLR bounds that diverge at once.
    (checkpoints / training.RUN_KEY_FILE).unlink()
    with pytest.raises(training.DivergenceError) as caught:
        training.run_training(
            tiny_dataset,
            tmp_path / "out",
            _config(3),
            min_lr=1e30,
            max_lr=1e35,
            checkpoint_dir=checkpoints,
        )
    err = caught.value
    assert err.step >= 2 * STEPS
    assert err.checkpoint is not None and err.checkpoint.endswith("ckpt-2")
    assert err.checkpoint in str(err)
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-2")
    assert not (checkpoints / "ckpt-3.json").exists()
    reader = tf.train.load_checkpoint(err.checkpoint)
    for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.isfinite(value).all(), key


def test_each_epoch_has_its_own_data_order_whatever_ran_before(tiny_dataset):
    from cycleprune import training
    from cycleprune.config import DataConfig

    assert training.epoch_seed(42, 3) == training.epoch_seed(42, 3)
    seeds = {training.epoch_seed(42, e) for e in range(50)} | {training.epoch_seed(43, 0)}
    assert len(seeds) == 51 and all(0 <= s < 2**31 - 16 for s in seeds)
    with pytest.raises(ValueError, match="epoch=-1"):
        training.epoch_seed(42, -1)

    batches = training.epoch_batches(tiny_dataset, DataConfig(), batch_size=32)

    def labels(epoch):  # the first batch's labels: the shuffle order
        return next(iter(batches(epoch)))[1].numpy().argmax(axis=1).tolist()

    later = labels(2)
    assert labels(0) != later and labels(2) == later  # no hidden state carried between calls


@pytest.mark.parametrize(("per_call", "per_call_resumed"), [(1, 1), (3, 3), (1, 3)])
def test_sigterm_mid_epoch_saves_the_exact_step_and_resumes_to_the_same_weights(
    two_epochs, tiny_dataset, tmp_path, monkeypatch, per_call, per_call_resumed
):
    import os
    import signal

    from cycleprune import models, preemption, training

    class SigtermAtStep(training._StopIfRequested):  # a real SIGTERM, at a known step
        def on_train_batch_begin(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == STEPS:
                os.kill(os.getpid(), signal.SIGTERM)

    def steps_per_call(n):
        return config.replace(train=dataclasses.replace(config.train, steps_per_execution=n))

    reference_out, config, reference = two_epochs
    # The signal comes as the second epoch's first call starts: training stops after that call.
    with monkeypatch.context() as patch:
        patch.setattr(training, "_StopIfRequested", SigtermAtStep)
        with pytest.raises(preemption.PreemptedError) as caught:
            training.run_training(
                tiny_dataset, tmp_path, steps_per_call(per_call), min_lr=MIN_LR, max_lr=MAX_LR
            )
    stop = STEPS + per_call
    assert caught.value.step == stop
    partial = tmp_path / "checkpoints" / training.PARTIAL_DIR
    state = json.loads((partial / training.PARTIAL_STATE).read_text())
    assert (state["epoch"], state["global_step"], state["step_in_epoch"]) == (1, stop, per_call)
    assert caught.value.checkpoint == str(partial / state["checkpoint"])
    assert signal.getsignal(signal.SIGTERM) is not SigtermAtStep  # the handler is gone

    # The resumed run may loop differently: (1, 3) skips 1 step, then runs calls of 3, 3, 1.
    resumed = training.run_training(
        tiny_dataset, tmp_path, steps_per_call(per_call_resumed), min_lr=MIN_LR, max_lr=MAX_LR
    )
    assert resumed.epochs_run == 1 and resumed.global_step == 2 * STEPS
    assert not partial.exists()
    epochs = resumed.history["epochs"]
    assert epochs[1].pop("resumed_at_step") == per_call
    # The epoch's training metrics cover all its steps (saved accumulators + the rest).
    for got, want in zip(epochs, reference.history["epochs"], strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    ours = models.load_model(resumed.model_path).get_weights()
    theirs = models.load_model(reference_out / "model.keras").get_weights()
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_steps_per_execution_loops_in_the_graph_to_the_same_result(
    two_epochs, tiny_dataset, tmp_path, monkeypatch
):
    from cycleprune import models, training

    reference_out, config, reference = two_epochs
    ends: list[int] = []

    class CountCalls(training._StopIfRequested):  # runs once per call of the train function
        def on_train_batch_end(self, batch, logs=None):
            ends.append(int(self.model.optimizer.iterations.numpy()))

    looped = config.replace(train=dataclasses.replace(config.train, steps_per_execution=3))
    with monkeypatch.context() as patch:
        patch.setattr(training, "_StopIfRequested", CountCalls)
        result = training.run_training(tiny_dataset, tmp_path, looped, min_lr=MIN_LR, max_lr=MAX_LR)
    # 8 steps per epoch in calls of 3, 3 and the remaining 2; no step lost or added.
    assert ends == [3, 6, 8, 11, 14, 16]
    assert result.global_step == reference.global_step == 2 * STEPS
    # Equal weights: the LR moved every step inside the calls (a frozen LR would differ).
    for got, want in zip(result.history["epochs"], reference.history["epochs"], strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    ours = models.load_model(result.model_path).get_weights()
    theirs = models.load_model(reference_out / "model.keras").get_weights()
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_rejects_what_several_steps_per_call_would_break(tmp_path):
    from cycleprune import training

    ds = _tiny(4, 2)

    def fit(val_ds=None, callbacks=(), per_call=2):
        _fit_tiny(
            ds,
            tmp_path,
            steps_per_epoch=2,
            val_ds=val_ds,
            extra_callbacks=callbacks,
            steps_per_execution=per_call,
        )

    with pytest.raises(ValueError, match="steps_per_execution=0"):
        fit(per_call=0)
    with pytest.raises(ValueError, match=r"train\.steps_per_execution"):
        TrainConfig(steps_per_execution=0)

    # A callback that must run every step would run once per call.
    class EveryBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    with pytest.raises(ValueError, match=r"EveryBatch runs after every batch.*execution=2"):
        fit(callbacks=[EveryBatch()])
    # Keras cannot loop over validation data of unknown length; say so before training.
    unknown = ds.filter(lambda x, y: True)
    with pytest.raises(ValueError, match=r"validation data.*unknown length"):
        fit(val_ds=unknown)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    fit(val_ds=unknown, per_call=1)  # one step per call: fine
    assert (tmp_path / f"{training.CHECKPOINT_NAME}-1.json").is_file()


def test_half_written_and_damaged_checkpoints_are_never_restored(
    two_epochs, tiny_dataset, tmp_path, caplog
):
    from cycleprune import training

    first_out, _, first = two_epochs
    config = _config(3)

    # Killed while epoch 3's checkpoint was being written: files nobody lists, an orphan entry.
    checkpoints = tmp_path / "half"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    (checkpoints / "ckpt-3.index").write_bytes(b"\x00" * 10)
    (checkpoints / "ckpt-3.data-00000-of-00001").write_bytes(b"\x00" * 100)
    (checkpoints / "ckpt-3.json").write_text(json.dumps({"epoch": 3, "global_step": -1}))
    resumed = training.run_training(
        tiny_dataset,
        tmp_path / "a",
        config,
        min_lr=MIN_LR,
        max_lr=MAX_LR,
        checkpoint_dir=checkpoints,
    )
    assert resumed.epochs_run == 1 and resumed.global_step == 3 * STEPS
    assert resumed.history["epochs"][:2] == first.history["epochs"]
    assert json.loads((checkpoints / "ckpt-3.json").read_text())["global_step"] == 3 * STEPS
    assert tf.train.load_checkpoint(str(checkpoints / "ckpt-3"))  # rewritten, readable

    # The newest listed checkpoint damaged on disk: skipped for the previous one.
    checkpoints = tmp_path / "damaged"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    data_file = checkpoints / "ckpt-2.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="cycleprune.training"):
        resumed = training.run_training(
            tiny_dataset,
            tmp_path / "b",
            config,
            min_lr=MIN_LR,
            max_lr=MAX_LR,
            checkpoint_dir=checkpoints,
        )
    assert "Skipping unreadable checkpoint" in caplog.text and "ckpt-2" in caplog.text
    assert resumed.epochs_run == 2 and resumed.global_step == 3 * STEPS
    assert [e["epoch"] for e in resumed.history["epochs"]] == [1, 2, 3]


def test_write_outputs_writes_the_model_last(tmp_path, monkeypatch):
    # The next stage takes model.keras: a failure while writing the record leaves none.
    from cycleprune import storage, training

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "atomic_write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        training.write_outputs(model, tmp_path / "out", {"epochs": []}, None)
    assert not (tmp_path / "out" / "model.keras").exists()
    monkeypatch.undo()
    path = training.write_outputs(model, tmp_path / "out", {"epochs": []}, None)
    assert path == tmp_path / "out" / "model.keras" and path.is_file()
    assert json.loads((tmp_path / "out" / "history.json").read_text()) == {"epochs": []}
