"""CLR training with per-epoch checkpoints, resume, divergence detection and a JSON history.

Two layers. :func:`fit` is the reusable loop (pruning uses it too): it compiles the model with a
loss whose value passes through ``tf.debugging.check_numerics`` in the graph, restores the latest
checkpoint of ``checkpoint_dir`` if there is one, and runs ``model.fit`` with one per-epoch
callback that checks the weights are finite, writes the epoch's metrics as JSON and then saves a
``tf.train.Checkpoint`` (model, optimizer, epoch). Nothing Python runs per batch: the learning
rate is an in-graph schedule of ``optimizer.iterations`` and the NaN check is a graph op, so a
non-finite loss stops the step that produced it before any weight is updated.
:func:`run_training` is the stage on top: data, model, optimizer and loss from a :class:`Config`,
then ``out_dir/model.keras``, ``out_dir/history.json`` and ``out_dir/tensorboard/``.

Checkpoint layout (``checkpoint_dir``)::

    checkpoint              tf.train.CheckpointManager state
    ckpt-<epoch>.index/...  model + optimizer (so ``optimizer.iterations`` is the global step)
    ckpt-<epoch>.json       that epoch's metrics and metadata, written before the checkpoint
    tensorboard/            live TensorBoard logs (copied to ``out_dir/tensorboard`` at the end)

Resuming a run is calling it again with the same ``checkpoint_dir``: the model and optimizer are
restored, training continues at ``initial_epoch`` = the checkpoint's epoch, the cyclical LR
continues at the restored step, and the history starts with the earlier epochs' saved metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import storage
from cycleprune.compat import keras, tf
from cycleprune.config import Config, ScheduleConfig, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt"
TENSORBOARD_DIR = "tensorboard"
TRAIN_CHECKPOINTS_TO_KEEP = 3
_NONFINITE_TAG = "cycleprune: non-finite loss"
_ENTRY_RE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.json$")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights.

    Attributes:
        step: Global step (``optimizer.iterations``) of the failing update.
        lr: Learning rate the schedule gives at that step.
        checkpoint: Path of the last good checkpoint, or ``None`` when none was written yet.
    """

    def __init__(self, step: int, lr: float, checkpoint: str | None, what: str = "loss") -> None:
        self.step = int(step)
        self.lr = float(lr)
        self.checkpoint = checkpoint
        super().__init__(
            f"Training diverged: non-finite {what} at step {self.step} with learning rate "
            f"{self.lr:.6g}. Last good checkpoint: {checkpoint or 'none (no epoch completed)'}. "
            "Lower the learning rate bounds (schedule.max_lr) or rerun the LR range test."
        )


@dataclasses.dataclass
class TrainResult:
    """What :func:`run_training` produced.

    Attributes:
        model_path: ``out_dir/model.keras``.
        history: The content of ``out_dir/history.json``.
        epochs_run: Epochs trained by this call (fewer than the total after a resume).
        global_step: Optimizer steps in total, including resumed ones.
        min_lr, max_lr: The CLR bounds used.
        val_metrics: The last epoch's validation metrics, without the ``val_`` prefix.
    """

    model_path: str
    history: dict
    epochs_run: int
    global_step: int
    min_lr: float
    max_lr: float
    val_metrics: dict


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        epochs: One dict per epoch since the start of the run (restored ones included): ``epoch``
            (1-based), ``global_step``, ``lr`` (the LR of the epoch's last step, read from the
            optimizer), every Keras metric, and whatever ``epoch_metadata`` returned.
        initial_epoch: Epochs already done when this call started (restored from a checkpoint).
        epochs_run: Epochs trained by this call.
        global_step: ``optimizer.iterations`` at the end.
        checkpoints: The entries of the checkpoints still on disk, oldest first: the epoch dict
            plus ``checkpoint`` (the checkpoint path prefix, for ``tf.train.Checkpoint.restore``).
    """

    epochs: list[dict]
    initial_epoch: int
    epochs_run: int
    global_step: int
    checkpoints: list[dict]


@keras.utils.register_keras_serializable(package="cycleprune")
class PositiveClassAUC(keras.metrics.AUC):
    """ROC AUC of one class's probability against its one-hot label (one-vs-rest).

    ``keras.metrics.AUC`` on one-hot targets flattens all columns; for a binary task that is not
    the AUC of P(positive). This slices column ``class_id`` of both first.

    Args:
        class_id: Column of the positive class.
        name: Metric name.
        **kwargs: Other ``keras.metrics.AUC`` arguments.
    """

    def __init__(self, class_id: int = 1, name: str = "auc", **kwargs: Any) -> None:
        if isinstance(class_id, bool) or not isinstance(class_id, int) or class_id < 0:
            raise ValueError(f"Argument `class_id` must be an int >= 0. Received: {class_id=}")
        super().__init__(name=name, **kwargs)
        self.class_id = class_id

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(
            y_true[..., self.class_id], y_pred[..., self.class_id], sample_weight
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config["class_id"] = self.class_id
        return config


@keras.utils.register_keras_serializable(package="cycleprune")
class FiniteLoss(keras.losses.Loss):
    """A loss whose per-example values must be finite: ``tf.debugging.check_numerics`` in the graph.

    A NaN or Inf raises ``InvalidArgumentError`` inside the train step that computed it, before
    the gradients are applied, at no measurable cost (one op on a ``[batch]`` tensor).

    Args:
        loss: The loss to check (a ``keras.losses.Loss``; its reduction is kept).
    """

    def __init__(self, loss: keras.losses.Loss, name: str | None = None, **kwargs: Any) -> None:
        if isinstance(loss, dict):
            loss = keras.losses.deserialize(loss)
        if not isinstance(loss, keras.losses.Loss):
            raise ValueError(f"Argument `loss` must be a keras.losses.Loss. Received: {loss!r}")
        kwargs.setdefault("reduction", loss.reduction)
        super().__init__(name=name or loss.name, **kwargs)
        self.loss = loss

    def call(self, y_true, y_pred):
        return tf.debugging.check_numerics(self.loss.call(y_true, y_pred), _NONFINITE_TAG)

    def get_config(self) -> dict:
        config = super().get_config()
        config["loss"] = keras.losses.serialize(self.loss)
        return config


def default_metrics(num_classes: int, positive_class: int = 1) -> list:
    """Accuracy, plus AUC, precision and recall of ``positive_class``.

    Args:
        num_classes: Number of classes of the softmax output.
        positive_class: Class index treated as positive (1 = pneumonia).

    Returns:
        Fresh metric objects named ``accuracy``, ``auc``, ``precision`` and ``recall``.

    Raises:
        ValueError: ``positive_class`` is not a class index.
    """
    if not 0 <= positive_class < num_classes:
        raise ValueError(
            f"Argument `positive_class` must be in [0, {num_classes}). "
            f"Received: positive_class={positive_class}"
        )
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        PositiveClassAUC(class_id=positive_class, name="auc"),
        keras.metrics.Precision(class_id=positive_class, name="precision"),
        keras.metrics.Recall(class_id=positive_class, name="recall"),
    ]


def resolve_lr_bounds(
    schedule: ScheduleConfig, min_lr: float | None = None, max_lr: float | None = None
) -> tuple[float, float]:
    """The CLR bounds: explicit arguments first, then ``schedule.min_lr``/``schedule.max_lr``.

    Args:
        schedule: The schedule config (bounds of 0 mean "not set").
        min_lr, max_lr: Bounds from the LR range test, or ``None``.

    Returns:
        ``(min_lr, max_lr)`` with ``0 < min_lr < max_lr``.

    Raises:
        ValueError: only one explicit bound, no bounds anywhere, or invalid bounds.
    """
    if (min_lr is None) != (max_lr is None):
        raise ValueError(
            f"Pass both `min_lr` and `max_lr` or neither. Received: min_lr={min_lr}, "
            f"max_lr={max_lr}"
        )
    if min_lr is None:
        if not schedule.has_bounds:
            raise ValueError(
                "No learning rate bounds: run the LR range test (lr-finder) and pass its min_lr "
                "and max_lr, or set schedule.min_lr and schedule.max_lr. Received: "
                f"schedule.min_lr={schedule.min_lr}, schedule.max_lr={schedule.max_lr}"
            )
        min_lr, max_lr = schedule.min_lr, schedule.max_lr
    min_lr, max_lr = float(min_lr), float(max_lr)
    if not (math.isfinite(max_lr) and 0 < min_lr < max_lr):
        raise ValueError(
            f"Learning rate bounds must satisfy 0 < min_lr < max_lr. Received: min_lr={min_lr}, "
            f"max_lr={max_lr}"
        )
    return min_lr, max_lr


def training_epochs(train: TrainConfig, schedule: ScheduleConfig) -> int:
    """``train.epochs``, rounded up to whole CLR cycles when ``train.whole_cycles`` is set."""
    from cycleprune import schedules

    if train.whole_cycles:
        return schedules.whole_cycle_epochs(train.epochs, schedule.step_size_epochs)
    return train.epochs


def steps_per_epoch(dataset: tf.data.Dataset, num_examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the dataset's cardinality when known and finite, else
    ``ceil(num_examples / batch_size)``.

    Raises:
        ValueError: the dataset is empty (no step).
    """
    cardinality = int(dataset.cardinality())
    steps = cardinality if cardinality >= 0 else math.ceil(num_examples / batch_size)
    if steps < 1:
        raise ValueError(f"The training dataset yields no batch. Received: {num_examples=}")
    return steps


def learning_rate_at(optimizer: keras.optimizers.Optimizer, step: int) -> float:
    """The learning rate ``optimizer`` uses at global ``step`` (its schedule, or its constant)."""
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(schedule(tf.constant(step, tf.int64)))
    return float(keras.backend.get_value(optimizer.learning_rate))


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    *,
    optimizer: keras.optimizers.Optimizer,
    loss: keras.losses.Loss,
    epochs: int,
    steps_per_epoch: int,
    checkpoint_dir: str | os.PathLike,
    tensorboard_dir: str | os.PathLike | None = None,
    metrics: Sequence[Any] | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    epoch_metadata: Callable[[keras.Model], dict] | None = None,
    max_to_keep: int | None = None,
) -> FitResult:
    """Compile and train ``model`` with per-epoch checkpoints, resume and divergence detection.

    If ``checkpoint_dir`` holds a checkpoint, the model and optimizer are restored from the latest
    one (so ``optimizer.iterations``, and with it any schedule of the step, continues) and
    training resumes at that checkpoint's epoch; the earlier epochs' metrics are read back from
    their JSON entries. After every epoch the weights are checked to be finite, the epoch's entry
    (metrics, global step, LR, ``epoch_metadata(model)``) is written atomically as
    ``ckpt-<epoch>.json`` and then the checkpoint ``ckpt-<epoch>`` is saved, so a checkpoint never
    exists without its entry and never holds a non-finite weight.

    Args:
        model: The model (built; compiled here).
        train_ds: Training batches ``(x, y)`` or ``(x, y, sample_weight)``.
        val_ds: Validation batches, evaluated after every epoch, or ``None``.
        optimizer: The optimizer (its variables are built here, before any restore).
        loss: The loss; it is wrapped in :class:`FiniteLoss`.
        epochs: Total epochs of the run (restored ones included).
        steps_per_epoch: Optimizer steps per epoch. For a finite dataset it must equal the
            dataset's cardinality when that is known.
        checkpoint_dir: Checkpoint folder (created if missing).
        tensorboard_dir: TensorBoard log folder, or ``None`` for no logs. Every number of an
            epoch's entry is written once per epoch as a scalar ``epoch_<name>`` (step = epoch
            index), training values under ``train/`` and ``val_*`` under ``validation/``, the
            layout of Keras' TensorBoard callback; nested dicts from ``epoch_metadata`` become
            ``<name>/<key>``.
        metrics: Keras metrics (default: :func:`default_metrics` for 2 classes).
        extra_callbacks: More per-epoch callbacks; they run before the checkpoint is written
            (e.g. tfmot's ``UpdatePruningStep``, which re-applies the masks at epoch end).
        epoch_metadata: ``model -> dict`` of extra JSON-able numbers stored in each entry.
        max_to_keep: Checkpoints kept on disk (``None`` = all). Entries are always kept.

    Returns:
        A :class:`FitResult`.

    Raises:
        DivergenceError: a non-finite loss (training or validation) or non-finite weights.
        ValueError: bad ``epochs``/``steps_per_epoch``, a dataset whose cardinality disagrees
            with ``steps_per_epoch``, or a checkpoint that does not match the model.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Argument `{name}` must be an int >= 1. Received: {name}={value!r}")
    cardinality = int(train_ds.cardinality())
    if cardinality >= 0 and cardinality != steps_per_epoch:
        raise ValueError(
            f"Argument `steps_per_epoch` must match the training dataset's {cardinality} batches. "
            f"Received: steps_per_epoch={steps_per_epoch}"
        )
    infinite = cardinality == tf.data.INFINITE_CARDINALITY
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        # tf_keras counts one extra optimizer step per epoch on a dataset of unknown length
        # (the end-of-data call), which would shift the LR schedule; declare the length.
        train_ds = train_ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    model.compile(
        optimizer=optimizer,
        loss=FiniteLoss(loss),
        metrics=list(metrics) if metrics is not None else default_metrics(2),
    )
    # Create the slot variables now so that a restore fills them instead of deferring.
    optimizer.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(
        checkpoint, str(checkpoint_dir), max_to_keep=max_to_keep, checkpoint_name=CHECKPOINT_NAME
    )

    initial_epoch = 0
    if manager.latest_checkpoint:
        _restore(checkpoint, manager.latest_checkpoint)
        initial_epoch = int(epoch_var.numpy())
        expected = initial_epoch * steps_per_epoch
        if int(optimizer.iterations.numpy()) != expected:
            logger.warning(
                "Restored step %d but %d epochs of %d steps make %d: steps_per_epoch changed "
                "since the checkpoint was written.",
                int(optimizer.iterations.numpy()),
                initial_epoch,
                steps_per_epoch,
                expected,
            )
        logger.info("Resuming from %s at epoch %d", manager.latest_checkpoint, initial_epoch)
    previous = [e for e in read_entries(checkpoint_dir) if e["epoch"] <= initial_epoch]

    recorder = _EpochCheckpoint(
        checkpoint_dir=checkpoint_dir,
        manager=manager,
        epoch_var=epoch_var,
        steps_per_epoch=steps_per_epoch,
        tensorboard_dir=tensorboard_dir,
        epoch_metadata=epoch_metadata,
    )
    callbacks: list[keras.callbacks.Callback] = [*extra_callbacks, recorder]

    if initial_epoch < epochs:
        try:
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=epochs,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch if infinite else None,
                callbacks=callbacks,
                verbose=0,
            )
        except tf.errors.InvalidArgumentError as err:
            if _NONFINITE_TAG not in str(err):
                raise
            step = int(optimizer.iterations.numpy())
            raise DivergenceError(
                step, learning_rate_at(optimizer, step), manager.latest_checkpoint
            ) from None
        finally:
            recorder.close()  # on_train_end does not run when fit raises
    else:
        logger.warning(
            "%s is already at epoch %d of %d: nothing to train.",
            manager.latest_checkpoint,
            initial_epoch,
            epochs,
        )

    entries = {e["epoch"]: e for e in previous}
    entries.update({e["epoch"]: e for e in recorder.entries})
    on_disk = {_checkpoint_epoch(path): path for path in manager.checkpoints}
    kept = [
        {**entries[epoch], "checkpoint": path}
        for epoch, path in sorted(on_disk.items())
        if epoch in entries
    ]
    return FitResult(
        epochs=[_without_checkpoint(entries[k]) for k in sorted(entries)],
        initial_epoch=initial_epoch,
        epochs_run=len(recorder.entries),
        global_step=int(optimizer.iterations.numpy()),
        checkpoints=kept,
    )


def read_entries(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """The per-epoch JSON entries written by :func:`fit` in ``checkpoint_dir``, by epoch."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    entries = []
    for path in checkpoint_dir.iterdir():
        if _ENTRY_RE.match(path.name):
            entries.append(storage.read_json(path))
    return sorted(entries, key=lambda e: e["epoch"])


def run_training(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
    *,
    min_lr: float | None = None,
    max_lr: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train the configured model under a cyclical learning rate (Smith 2017).

    The LR follows ``CyclicalLearningRate(min_lr, max_lr, step_size)`` with
    ``step_size = clr_step_size(steps_per_epoch, schedule.step_size_epochs)``, evaluated in the
    graph from ``optimizer.iterations``. Epochs are ``train.epochs``, rounded up to whole cycles
    when ``train.whole_cycles``. Training batches carry per-example weights from
    ``data.class_weights``. Calling again with the same ``checkpoint_dir`` resumes (see
    :func:`fit`); a larger ``train.epochs`` extends a finished run.

    Writes ``out_dir/model.keras`` (weights and architecture, no optimizer or compile state; load
    with ``models.load_model``), ``out_dir/history.json`` and ``out_dir/tensorboard/``, each
    appearing atomically. ``history.json`` holds ``epochs`` (one dict per epoch, see
    :class:`FitResult`), ``lr`` (the LR of every step ``0..global_step-1``, from the closed form
    :func:`cycleprune.schedules.clr`), ``min_lr``, ``max_lr``, ``step_size``, ``policy``,
    ``gamma``, ``num_epochs``, ``steps_per_epoch`` and ``global_step``.

    Args:
        dataset_dir: A prepared dataset (train and val splits).
        out_dir: Output folder.
        config: The run configuration.
        min_lr, max_lr: CLR bounds (e.g. from the LR range test); default: the config's.
        checkpoint_dir: Checkpoint folder; default ``out_dir/checkpoints``.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: no LR bounds (run the LR range test or set schedule.min_lr/max_lr), or
            invalid ones.
        DivergenceError: the loss or the weights became non-finite.
        cycleprune.data.DataError: a bad dataset.
    """
    from cycleprune import data, losses, models, schedules

    low, high = resolve_lr_bounds(config.schedule, min_lr, max_lr)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    info = data.load_info(str(dataset_dir))
    epochs = training_epochs(config.train, config.schedule)
    class_weight = data.class_weights(info, config.data)
    train_ds = data.make_dataset(
        str(dataset_dir), "train", config.data, training=True, class_weight=class_weight
    )
    val_ds = data.make_dataset(str(dataset_dir), "val", config.data, training=False)
    steps = steps_per_epoch(train_ds, info.num_examples("train"), config.data.batch_size)
    step_size = schedules.clr_step_size(steps, config.schedule.step_size_epochs)
    logger.info(
        "Training %d epochs x %d steps, CLR %.3g..%.3g (%s, step size %d)",
        epochs,
        steps,
        low,
        high,
        config.schedule.policy,
        step_size,
    )

    model = models.build_model(
        config.model, info.image_shape, info.num_classes, seed=config.train.seed
    )
    optimizer = schedules.make_optimizer(
        config.train, config.schedule, min_lr=low, max_lr=high, steps_per_epoch=steps
    )
    result = fit(
        model,
        train_ds,
        val_ds,
        optimizer=optimizer,
        loss=losses.make_loss(config.train),
        epochs=epochs,
        steps_per_epoch=steps,
        checkpoint_dir=checkpoint_dir,
        tensorboard_dir=checkpoint_dir / TENSORBOARD_DIR,
        metrics=default_metrics(info.num_classes, config.evaluate.positive_class),
        max_to_keep=TRAIN_CHECKPOINTS_TO_KEEP,
    )

    lrs = schedules.clr(
        np.arange(result.global_step),
        low,
        high,
        step_size,
        policy=config.schedule.policy,
        gamma=config.schedule.gamma,
    )
    history = {
        "epochs": result.epochs,
        "lr": lrs.tolist(),
        "min_lr": low,
        "max_lr": high,
        "step_size": step_size,
        "policy": config.schedule.policy,
        "gamma": config.schedule.gamma,
        "num_epochs": epochs,
        "steps_per_epoch": steps,
        "global_step": result.global_step,
    }
    model_path = write_outputs(model, out_dir, history, checkpoint_dir / TENSORBOARD_DIR)
    return TrainResult(
        model_path=str(model_path),
        history=history,
        epochs_run=result.epochs_run,
        global_step=result.global_step,
        min_lr=low,
        max_lr=high,
        val_metrics=val_metrics(result.epochs),
    )


def val_metrics(epochs: Sequence[dict]) -> dict:
    """The last epoch's ``val_*`` metrics without the prefix (``{}`` when there is none)."""
    if not epochs:
        return {}
    last = epochs[-1]
    return {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}


def write_outputs(
    model: keras.Model,
    out_dir: str | os.PathLike,
    history: dict,
    tensorboard_src: str | os.PathLike | None,
) -> Path:
    """Write ``model.keras``, ``history.json`` and a copy of the TensorBoard logs, each atomically.

    The model is saved as an uncompiled copy (architecture and weights; no optimizer, loss or
    metrics), so loading it never needs the training-time classes.

    Returns:
        The path of ``model.keras``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_model(model, out_dir / "model.keras")
    storage.atomic_write_json(out_dir / "history.json", history)
    if tensorboard_src is not None and Path(tensorboard_src).is_dir():
        with storage.atomic_dir(out_dir / TENSORBOARD_DIR) as tmp:
            shutil.copytree(tensorboard_src, tmp, dirs_exist_ok=True)
    return model_path


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save an uncompiled copy of ``model`` to ``path`` (``.keras``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export = keras.models.clone_model(model)
    export.set_weights(model.get_weights())
    tmp = path.with_name(f"{storage.TMP_PREFIX}{path.stem}.{os.getpid()}{path.suffix}")
    try:
        export.save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class _EpochCheckpoint(keras.callbacks.Callback):
    """Per-epoch: finite-weights check, JSON entry, checkpoint, LR scalar. No batch hooks."""

    def __init__(
        self,
        *,
        checkpoint_dir: Path,
        manager: tf.train.CheckpointManager,
        epoch_var: tf.Variable,
        steps_per_epoch: int,
        tensorboard_dir: str | os.PathLike | None,
        epoch_metadata: Callable[[keras.Model], dict] | None,
    ) -> None:
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.manager = manager
        self.epoch_var = epoch_var
        self.steps_per_epoch = steps_per_epoch
        self.tensorboard_dir = tensorboard_dir
        self.epoch_metadata = epoch_metadata
        self.entries: list[dict] = []
        self._writer = None

    def on_train_begin(self, logs=None):
        if self.tensorboard_dir is not None:
            self._writer = _ScalarWriter(self.tensorboard_dir)

    def on_train_end(self, logs=None):
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        optimizer = self.model.optimizer
        step = int(optimizer.iterations.numpy())
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            raise DivergenceError(
                step,
                learning_rate_at(optimizer, max(step - 1, 0)),
                self.manager.latest_checkpoint,
                what="weights",
            )
        number = epoch + 1
        lr = float(optimizer.learning_rate.numpy())  # the LR of the epoch's last step
        entry: dict[str, Any] = {"epoch": number, "global_step": step, "lr": lr}
        entry.update({k: float(v) for k, v in (logs or {}).items()})
        momentum_schedule = getattr(optimizer, "momentum_schedule", None)
        if momentum_schedule is not None:  # cyclical momentum: the value of the last step
            entry["momentum"] = float(momentum_schedule(step - 1))
        if self.epoch_metadata is not None:
            entry.update(self.epoch_metadata(self.model))
        storage.atomic_write_json(self.checkpoint_dir / f"{CHECKPOINT_NAME}-{number}.json", entry)
        self.epoch_var.assign(number)
        path = self.manager.save(checkpoint_number=number)
        self.entries.append(entry)
        if self._writer is not None:
            self._writer.write(entry, step=epoch)
        logger.info(
            "epoch %d/%s step %d lr %.4g %s -> %s",
            number,
            self.params.get("epochs"),
            step,
            lr,
            " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items()),
            path,
        )


class _ScalarWriter:
    """Per-epoch TensorBoard scalars in Keras' layout, without the ``tensorboard`` package.

    ``tf.summary.scalar`` lives in the ``tensorboard`` package, which the runtime image does not
    ship; ``tf.summary.write`` with the scalars plugin's metadata is core TensorFlow and gives
    the same event records.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        from tensorflow.core.framework import summary_pb2

        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )
        log_dir = Path(log_dir)
        self._train = tf.summary.create_file_writer(str(log_dir / "train"))
        self._validation = tf.summary.create_file_writer(str(log_dir / "validation"))

    def write(self, values: dict, step: int) -> None:
        for name, value in _flatten(values):
            if name == "epoch":
                continue
            writer, tag = self._train, name
            if name.startswith("val_"):
                writer, tag = self._validation, name.removeprefix("val_")
            with writer.as_default():
                tf.summary.write(
                    f"epoch_{tag}",
                    tf.constant(value, tf.float32),
                    step=step,
                    metadata=self._metadata,
                )
        self._train.flush()
        self._validation.flush()

    def close(self) -> None:
        self._train.close()
        self._validation.close()


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, float]]:
    flat = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.extend(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            flat.append((name, float(value)))
    return flat


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    try:
        checkpoint.restore(path).assert_existing_objects_matched().expect_partial()
    except (AssertionError, ValueError, tf.errors.OpError) as err:
        raise ValueError(
            f"Checkpoint {path} does not match this model and optimizer (use an empty "
            f"checkpoint_dir for a new run): {err}"
        ) from None


def _checkpoint_epoch(path: str) -> int:
    return int(path.rsplit("-", 1)[-1])


def _without_checkpoint(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "checkpoint"}
