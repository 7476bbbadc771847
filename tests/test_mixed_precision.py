"""cycleprune.precision: auto resolution, the policy scope, loss scaling, float32 exports, and
mixed precision in the training, LR-finder and pruning stages (on CPU: tiny models, few steps)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile

import numpy as np
import pytest

from cycleprune import precision
from cycleprune.compat import keras, tf
from cycleprune.config import ModelConfig, PruneConfig, TrainConfig, preset

MIN_LR, MAX_LR = 1e-3, 1e-1
STEPS = 8  # ceil(240 tiny training images / batch 32)
SMOKE_MODEL = ModelConfig(width=0.125, batch_norm=True)
LOSS_SCALE = "optimizer/loss_scale/current_loss_scale/.ATTRIBUTES/VARIABLE_VALUE"
GOOD_STEPS = "optimizer/loss_scale/good_steps/.ATTRIBUTES/VARIABLE_VALUE"


def _policy() -> str:
    return keras.mixed_precision.global_policy().name


@pytest.fixture(autouse=True)
def _float32_around_each_test():
    """Every test starts and must end with the float32 policy (the scope restores it)."""
    assert _policy() == "float32"
    yield
    leaked = _policy()
    keras.mixed_precision.set_global_policy("float32")
    assert leaked == "float32", f"the global policy leaked: {leaked}"


def _config(epochs: int, precision_name: str = "mixed_float16"):
    config = preset("smoke")
    return config.replace(
        # with every augmentation of the small preset (contrast included), which the
        # training builds inside the mixed-precision policy scope
        data=dataclasses.replace(config.data, contrast=0.2),
        train=dataclasses.replace(
            config.train, epochs=epochs, whole_cycles=False, precision=precision_name
        ),
        schedule=dataclasses.replace(config.schedule, step_size_epochs=1.5),
    )


def _clr(step: int, config) -> float:
    from cycleprune import schedules

    step_size = schedules.clr_step_size(STEPS, config.schedule.step_size_epochs)
    return float(schedules.clr(step, MIN_LR, MAX_LR, step_size, config.schedule.policy))


def _assert_float32_file(path) -> None:
    """Every layer of a saved model is float32, however the global policy is set when loading."""
    from cycleprune import models

    with zipfile.ZipFile(path) as archive:
        assert b"mixed_float16" not in archive.read("config.json")
    for name in ("float32", "mixed_float16"):
        with precision.policy_scope(name):
            loaded = models.load_model(path)
        policies = {layer.name: layer.dtype_policy.name for layer in loaded.layers}
        assert set(policies.values()) == {"float32"}, policies
        assert loaded.output.dtype == tf.float32


# --- resolution and config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "gpus", "expected"),
    [
        ("auto", [], "float32"),  # no GPU (this CPU machine)
        ("auto", [{"compute_capability": (7, 0)}], "mixed_float16"),  # V100
        ("auto", [{"compute_capability": (8, 9)}, {"compute_capability": (9, 0)}], "mixed_float16"),
        ("auto", [{"compute_capability": (6, 1)}], "float32"),  # P4/P40: no tensor cores
        ("auto", [{"compute_capability": (8, 0)}, {"compute_capability": (6, 1)}], "float32"),
        ("auto", [{"device_name": "no capability reported"}], "float32"),
        ("float32", [{"compute_capability": (9, 0)}], "float32"),
        ("mixed_float16", [], "mixed_float16"),
    ],
)
def test_resolve_precision(setting, gpus, expected):
    assert precision.resolve_precision(setting, gpus) == expected


def test_resolve_precision_rejects_unknown_settings():
    with pytest.raises(ValueError, match="must be one of auto, float32, mixed_float16"):
        precision.resolve_precision("float16", [])


def test_train_precision_is_validated_and_defaults_to_auto():
    from cycleprune.config import Config

    assert TrainConfig().precision == "auto"
    for value in precision.PRECISIONS:
        assert TrainConfig(precision=value).precision == value
    with pytest.raises(
        ValueError,
        match=r"train\.precision must be one of auto, float32, mixed_float16\. "
        r"Received: train\.precision='float16'",
    ):
        TrainConfig(precision="float16")
    with pytest.raises(ValueError, match=r"train\.precision=.bf16."):
        preset("smoke").override(["train.precision=bf16"])
    config = preset("smoke").override(["train.precision=mixed_float16"])
    assert Config.from_yaml(config.to_yaml()).train.precision == "mixed_float16"


# --- policy scope, optimizer, export ---------------------------------------------------------


def test_policy_scope_sets_and_restores_the_global_policy_even_on_error():
    with precision.policy_scope("mixed_float16"):
        assert _policy() == "mixed_float16"
        with precision.policy_scope("float32"):
            assert _policy() == "float32"
        assert _policy() == "mixed_float16"
    assert _policy() == "float32"
    with pytest.raises(RuntimeError, match="boom"), precision.policy_scope("mixed_float16"):
        raise RuntimeError("boom")
    assert _policy() == "float32"
    with pytest.raises(ValueError, match="resolve 'auto' first"), precision.policy_scope("auto"):
        pass


def test_model_built_in_the_scope_is_mixed_with_a_float32_classifier():
    from cycleprune import models

    with precision.policy_scope("mixed_float16"):
        model = models.build_model(SMOKE_MODEL, (28, 28, 1), 2, seed=0)
    assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("block1_conv1").compute_dtype == "float16"
    assert model.get_layer("predictions").dtype_policy.name == "float32"
    assert model.output.dtype == tf.float32
    assert all(w.dtype == np.float32 for w in model.get_weights())  # float32 variables


def test_wrap_optimizer_wraps_once_and_only_for_mixed_precision():
    sgd = keras.optimizers.SGD(0.1)
    assert precision.wrap_optimizer(sgd, "float32") is sgd
    wrapped = precision.wrap_optimizer(sgd, "mixed_float16")
    assert precision.is_loss_scaled(wrapped) and not precision.is_loss_scaled(sgd)
    assert precision.wrap_optimizer(wrapped, "mixed_float16") is wrapped
    assert precision.inner_optimizer(wrapped) is sgd and precision.inner_optimizer(sgd) is sgd


def test_learning_rate_at_reads_the_schedule_through_the_loss_scale_wrapper():
    from cycleprune import schedules, training

    schedule = schedules.CyclicalLearningRate(MIN_LR, MAX_LR, 4)
    wrapped = precision.wrap_optimizer(keras.optimizers.SGD(schedule), "mixed_float16")
    for step in (0, 3, 6):
        expected = float(schedules.clr(step, MIN_LR, MAX_LR, 4))
        assert training.learning_rate_at(wrapped, step) == pytest.approx(expected, rel=1e-6)


def test_to_float32_copies_a_mixed_model_into_float32_layers():
    from cycleprune import models

    with precision.policy_scope("mixed_float16"):
        mixed = models.build_model(SMOKE_MODEL, (28, 28, 1), 2, seed=0)
    copy = precision.to_float32(mixed)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert [layer.name for layer in copy.layers] == [layer.name for layer in mixed.layers]
    for a, b in zip(mixed.get_weights(), copy.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).uniform(0, 255, (4, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(copy(x).numpy(), mixed(x).numpy(), atol=5e-3)


# --- checkpoints ------------------------------------------------------------------------------


def _checkpoint(folder, optimizer) -> str:
    optimizer.build([tf.Variable(np.ones(3, np.float32))])
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(optimizer=optimizer), str(folder), 1)
    return manager.save()


def test_stage_precision_keeps_a_run_in_the_precision_of_its_checkpoints(tmp_path):
    v100 = [{"compute_capability": (7, 0)}]
    float32_dir, mixed_dir = tmp_path / "f32", tmp_path / "mixed"
    float32_ckpt = _checkpoint(float32_dir, keras.optimizers.SGD(0.1))
    mixed_ckpt = _checkpoint(
        mixed_dir, precision.wrap_optimizer(keras.optimizers.SGD(0.1), "mixed_float16")
    )
    assert precision.checkpoint_precision(float32_ckpt) == "float32"
    assert precision.checkpoint_precision(mixed_ckpt) == "mixed_float16"

    # No checkpoint (or no folder): what the machine says.
    assert precision.stage_precision("auto", [tmp_path / "missing"], gpus=v100) == "mixed_float16"
    # A float32 run resumed on a tensor-core GPU stays float32 under auto...
    assert precision.stage_precision("auto", [float32_dir], gpus=v100) == "float32"
    # ...and cannot be forced to mixed precision (a float32 checkpoint has no loss scale).
    with pytest.raises(ValueError, match=r"mixed_float16 cannot resume .*written in float32"):
        precision.stage_precision("mixed_float16", [float32_dir], gpus=v100)
    # A mixed-precision checkpoint resumes in either precision.
    assert precision.stage_precision("auto", [mixed_dir], gpus=v100) == "mixed_float16"
    assert precision.stage_precision("auto", [mixed_dir], gpus=[]) == "float32"
    assert precision.stage_precision("float32", [mixed_dir], gpus=v100) == "float32"
    # The first folder holding a checkpoint decides.
    assert precision.stage_precision(
        "auto", [tmp_path / "x", mixed_dir, float32_dir], gpus=v100
    ) == ("mixed_float16")


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tiny_dataset, tmp_path_factory):
    from cycleprune import training

    assert _policy() == "float32"
    out = tmp_path_factory.mktemp("mixed")
    config = _config(1)
    seen = []
    real_fit = training.fit

    def spy(model, *args, **kwargs):
        policies = {layer.dtype_policy.name for layer in model.layers}
        seen.append((_policy(), policies, type(kwargs["optimizer"]).__name__))
        return real_fit(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "fit", spy)
        result = training.run_training(tiny_dataset, out, config, min_lr=MIN_LR, max_lr=MAX_LR)
    return out, config, result, seen


def test_training_forced_to_mixed_precision(mixed_run, tiny_dataset):
    from cycleprune import data, models

    out, config, result, seen = mixed_run
    # Built and trained under mixed_float16 (float32 classifier and input), loss-scaled.
    assert seen == [
        ("mixed_float16", {"mixed_float16", "float32"}, "LossScaleOptimizerV3"),
    ]
    assert _policy() == "float32"  # restored after the stage
    history = json.loads((out / "history.json").read_text())
    assert history["precision"] == result.history["precision"] == "mixed_float16"
    assert result.global_step == STEPS
    for entry in history["epochs"]:
        assert np.isfinite(entry["loss"]) and np.isfinite(entry["val_loss"])
        # The epoch's LR read through the LossScaleOptimizer: the schedule at the last step.
        assert entry["lr"] == pytest.approx(_clr(entry["global_step"] - 1, config), rel=1e-6)
    # The optimizer was a LossScaleOptimizer: its loss scale is in the checkpoint.
    reader = tf.train.load_checkpoint(str(out / "checkpoints" / "ckpt-1"))
    assert reader.has_tensor(LOSS_SCALE) and 1 <= reader.get_tensor(LOSS_SCALE) <= 2**15
    assert precision.checkpoint_precision(str(out / "checkpoints" / "ckpt-1")) == "mixed_float16"

    _assert_float32_file(out / "model.keras")
    loaded = models.load_model(out / "model.keras")
    x, _ = data.load_arrays(tiny_dataset, "val")
    predictions = loaded.predict(x[:16].astype(np.float32), verbose=0)
    assert predictions.dtype == np.float32 and np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-5)


def test_resume_under_mixed_precision(mixed_run, tiny_dataset, tmp_path):
    from cycleprune import training

    first_out, _, first, _ = mixed_run
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(first_out / "checkpoints", checkpoints)
    before = tf.train.load_checkpoint(str(checkpoints / "ckpt-1"))
    config = _config(2)

    resumed = training.run_training(
        tiny_dataset,
        tmp_path / "resumed",
        config,
        min_lr=MIN_LR,
        max_lr=MAX_LR,
        checkpoint_dir=checkpoints,
    )
    assert _policy() == "float32"
    assert resumed.epochs_run == 1 and resumed.global_step == 2 * STEPS
    assert resumed.history["precision"] == "mixed_float16"
    epochs = resumed.history["epochs"]
    assert epochs[:1] == first.history["epochs"]
    # optimizer.iterations came back through the wrapper: the CLR continues at the saved step.
    assert epochs[1]["lr"] == pytest.approx(_clr(2 * STEPS - 1, config), rel=1e-6)
    assert epochs[1]["lr"] != pytest.approx(_clr(STEPS - 1, config), rel=1e-3)
    after = tf.train.load_checkpoint(str(checkpoints / "ckpt-2"))
    iterations = [k for k in after.get_variable_to_shape_map() if "iter" in k]
    assert [int(after.get_tensor(k)) for k in iterations] == [2 * STEPS]
    # The loss scale went on from the saved one rather than restarting at 2**15: it never grows
    # in 8 steps (growth takes 2000), and with no overflow its good-step counter goes on.
    scale, good = float(before.get_tensor(LOSS_SCALE)), int(before.get_tensor(GOOD_STEPS))
    new_scale, new_good = float(after.get_tensor(LOSS_SCALE)), int(after.get_tensor(GOOD_STEPS))
    assert new_scale <= scale
    if new_scale == scale:
        assert new_good == good + STEPS
    _assert_float32_file(tmp_path / "resumed" / "model.keras")


# --- the training loop under loss scaling (a tiny model, synthetic data) ----------------------


def _tiny_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(
        4, 3, padding="same", kernel_initializer=keras.initializers.HeUniform(0)
    )(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(
        2,
        activation="softmax",
        dtype="float32",
        kernel_initializer=keras.initializers.GlorotUniform(1),
    )(x)
    return keras.Model(inputs, outputs)


def _tiny_data(n: int = 32, batch: int = 8) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n)]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


class _AtTrainBegin(keras.callbacks.Callback):
    """Records the optimizer's loss scale and step when ``model.fit`` starts (after a restore)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        self.seen.append((float(optimizer.loss_scale), int(optimizer.iterations.numpy())))


def _fit_tiny(checkpoint_dir, epochs: int, callbacks=(), mixed: bool = True, **loss_scale):
    from cycleprune import training

    with precision.policy_scope("mixed_float16" if mixed else "float32"):
        model = _tiny_model()
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        if mixed:
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer, **loss_scale)
        result = training.fit(
            model,
            _tiny_data(),
            None,
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(),
            epochs=epochs,
            steps_per_epoch=4,
            checkpoint_dir=checkpoint_dir,
            extra_callbacks=callbacks,
            handle_sigterm=False,
        )
    return model, optimizer, result


def test_fit_restores_the_loss_scale_and_the_step(tmp_path):
    # The scale grows every 2 good steps from 2**8: after 4 steps it is distinctive (not 2**8).
    _, first, _ = _fit_tiny(tmp_path, 1, initial_scale=2.0**8, dynamic_growth_steps=2)
    saved = float(first.loss_scale)
    assert saved != 2.0**8 and int(first.iterations.numpy()) == 4

    spy = _AtTrainBegin()
    _, _, result = _fit_tiny(
        tmp_path, 2, callbacks=[spy], initial_scale=2.0**8, dynamic_growth_steps=2
    )
    assert spy.seen == [(saved, 4)]
    assert result.initial_epoch == 1 and result.global_step == 8


def test_a_mixed_precision_checkpoint_resumes_in_float32(tmp_path):
    mixed_model, _, _ = _fit_tiny(tmp_path, 1)
    weights = mixed_model.get_weights()
    model, optimizer, result = _fit_tiny(tmp_path, 2, mixed=False)
    assert not precision.is_loss_scaled(optimizer)
    assert result.initial_epoch == 1 and result.epochs_run == 1 and result.global_step == 8
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert not all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))


def test_loss_scale_overflow_steps_are_skipped_not_divergence(tmp_path):
    # Scaled by 2**40 every float16 gradient overflows: each step is skipped (weights untouched)
    # and halves the scale. The finite-loss check sees the unscaled loss, so nothing raises, and
    # the skipped steps still count in optimizer.iterations (the CLR's and fit's global step).
    with precision.policy_scope("mixed_float16"):
        initial = _tiny_model().get_weights()
    model, optimizer, result = _fit_tiny(tmp_path, 2, initial_scale=2.0**40)
    assert result.global_step == int(optimizer.iterations.numpy()) == 8
    assert float(optimizer.loss_scale) == 2.0**32  # 8 halvings
    for a, b in zip(initial, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert all(np.isfinite(e["loss"]) for e in result.epochs)


# --- LR finder --------------------------------------------------------------------------------


def test_lr_finder_sweeps_in_the_configured_precision(tiny_dataset, tmp_path):
    from cycleprune import lr_finder
    from cycleprune.config import LRFinderConfig

    base = _config(1)
    config = base.replace(
        lr_finder=LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=6),
        # Fixed bounds: a curve without usable descent is recorded instead of raised.
        schedule=dataclasses.replace(base.schedule, min_lr=MIN_LR, max_lr=MAX_LR),
    )
    result = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "lr", config)
    assert _policy() == "float32"
    assert result.precision == "mixed_float16"
    saved = json.loads((tmp_path / "lr" / "lr_finder.json").read_text())
    assert saved["precision"] == "mixed_float16"
    assert np.isfinite(result.losses).all() and result.steps >= 5


# --- pruning ----------------------------------------------------------------------------------


def test_tfmot_pruning_is_not_mixed_precision_safe():
    """Why run_pruning fine-tunes in float32 (precision.PRUNING_NOTE). If this starts failing,
    tfmot changed: revisit the note and let pruning use mixed precision."""
    import tensorflow_model_optimization as tfmot

    from cycleprune import models, pruning

    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    with precision.policy_scope("mixed_float16"):
        model = models.build_model(SMOKE_MODEL, (28, 28, 1), 2, seed=0)
        # 1. Wrapping the float32 classifier under the mixed policy fails.
        with pytest.raises((TypeError, ValueError), match=r"float16|float32"):
            pruning.prune_model(model, PruneConfig(), steps_per_epoch=4)
        # 2. A float16-compute layer's float32 master weights are rounded to float16 by the
        #    masking that runs on every forward pass (even at inference, even at sparsity 0).
        layer = keras.layers.Dense(64, kernel_initializer=keras.initializers.GlorotUniform(0))
        wrapped = tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        wrapped.build((None, 32))
        kernel = layer.kernel.numpy().copy()
        assert not _float16_values(kernel)
        wrapped(np.ones((1, 32), np.float32), training=False)
    assert _float16_values(layer.kernel.numpy())
    np.testing.assert_allclose(layer.kernel.numpy(), kernel, rtol=1e-3)

    # In float32 the same forward pass leaves the weights bit for bit.
    layer = keras.layers.Dense(64, kernel_initializer=keras.initializers.GlorotUniform(0))
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
    wrapped.build((None, 32))
    kernel = layer.kernel.numpy().copy()
    wrapped(np.ones((1, 32), np.float32), training=False)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def _float16_values(array: np.ndarray) -> bool:
    return bool(np.array_equal(array, array.astype(np.float16).astype(np.float32)))


def test_pruning_fine_tunes_in_float32_and_records_why(tiny_dataset, tmp_path, monkeypatch):
    from cycleprune import models, pruning, training

    base = tmp_path / "base.keras"
    with precision.policy_scope("mixed_float16"):  # trained in mixed precision, saved float32
        training.save_model(models.build_model(SMOKE_MODEL, (28, 28, 1), 2, seed=0), base)
    _assert_float32_file(base)

    seen = []
    real_fit = training.fit

    def spy(model, *args, **kwargs):
        seen.append((_policy(), {layer.dtype_policy.name for layer in model.layers}))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    prune = PruneConfig(final_sparsity=0.5, begin_epoch=0, end_epoch=1, epochs=1, frequency=2)
    config = _config(1).replace(prune=prune)
    # A caller's mixed policy neither leaks into the stage nor is lost after it.
    with precision.policy_scope("mixed_float16"):
        result = pruning.run_pruning(
            base, tiny_dataset, tmp_path / "pruned", config, min_lr=1e-3, max_lr=1e-2
        )
        assert _policy() == "mixed_float16"
    assert seen == [("float32", {"float32"})]
    assert result.history["precision"] == "float32"
    assert result.history["precision_note"] == precision.PRUNING_NOTE
    assert result.sparsity == pytest.approx(0.5, abs=0.01)
    _assert_float32_file(tmp_path / "pruned" / "model.keras")
    checkpoint = str(tmp_path / "pruned" / "checkpoints" / "ckpt-1")
    assert precision.checkpoint_precision(checkpoint) == "float32"

    # Asked for float32, there is nothing to explain.
    float32 = config.replace(train=dataclasses.replace(config.train, precision="float32"))
    again = pruning.run_pruning(
        base, tiny_dataset, tmp_path / "pruned", float32, min_lr=1e-3, max_lr=1e-2
    )
    assert again.history["precision_note"] == ""
