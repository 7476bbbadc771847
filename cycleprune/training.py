"""CLR training with checkpoints, exact resume, SIGTERM handling, divergence detection, history.

Two layers. :func:`fit` is the reusable loop (pruning uses it too): it compiles the model with a
loss whose value passes through ``tf.debugging.check_numerics`` in the graph, restores the
latest checkpoint of ``checkpoint_dir`` if there is one, and trains epoch by epoch with
``model.fit``; after each epoch it evaluates the validation data, checks that the weights are
finite, writes the epoch's metrics as JSON and then saves a ``tf.train.Checkpoint`` (model,
optimizer, epoch). Nothing Python runs per batch: the learning rate is an in-graph schedule of
``optimizer.iterations`` and the NaN check is a graph op, so a non-finite loss stops the step
that produced it before any weight is updated. :func:`run_training` is the stage on top: data,
model, optimizer and loss from a :class:`Config`, built inside a distribution strategy's scope
(:mod:`cycleprune.distribution`), then ``out_dir/model.keras``, ``out_dir/history.json`` and
``out_dir/tensorboard/``.

Checkpoint layout (``checkpoint_dir``)::

    checkpoint              tf.train.CheckpointManager state (written last: see below)
    ckpt-<epoch>.index/...  model + optimizer (so ``optimizer.iterations`` is the global step)
    ckpt-<epoch>.json       that epoch's metrics and metadata, written before the checkpoint
    partial/                at most one mid-epoch checkpoint, written on SIGTERM:
        step-<step>.*           model + optimizer + epoch
        state.json              its epoch, step and training-metric state (written last)
    tensorboard/            live TensorBoard logs (copied to ``out_dir/tensorboard`` at the end)

Every checkpoint is complete or absent: TensorFlow writes a checkpoint's files first, and only
then is the manager's ``checkpoint`` file, the list a restore looks up, rewritten atomically
(temporary file + rename). A process killed in the middle leaves either no trace or files nobody
lists (overwritten when that epoch is saved again).
An unreadable newest checkpoint (a damaged disk) is skipped for the previous one, with a warning.

Resuming is calling again with the same ``checkpoint_dir``. The model and optimizer are
restored, so the cyclical LR (a function of ``optimizer.iterations``), tfmot's pruning step (a
model variable) and the momentum continue where they were; training continues at the restored
epoch, at the restored step within it after a SIGTERM checkpoint. Each epoch's data order and
augmentation are a function of ``(data.seed, epoch)`` (:func:`epoch_seed`): the training data is
rebuilt for every epoch rather than reshuffled by one long-lived iterator, so a resumed run sees
the same batches as an uninterrupted one (a mid-epoch resume skips the batches already done).
With ``train.deterministic`` the arithmetic is deterministic too, and a killed-and-resumed run
ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import precision, storage
from cycleprune.compat import keras, tf
from cycleprune.config import Config, DataConfig, ScheduleConfig, TrainConfig
from cycleprune.preemption import PreemptedError, SigtermGuard

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "ckpt"
PARTIAL_DIR = "partial"
# The settings a checkpoint folder's run was started with; a resume must share them (fit).
RUN_KEY_FILE = "run.json"
PARTIAL_NAME = "step"
PARTIAL_STATE = "state.json"
TENSORBOARD_DIR = "tensorboard"
TRAIN_CHECKPOINTS_TO_KEEP = 3
_NONFINITE_TAG = "cycleprune: non-finite loss"
_ENTRY_RE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.json$")
# Data seeds stay below 2**31 with room for the augmentation layers' seed + 1..4.
_MAX_DATA_SEED = 2**31 - 16
# Metrics whose state variables are sums over batches: the state of a whole epoch is the sum of
# the states of its parts, so an epoch interrupted by SIGTERM still reports exact metrics.
_ADDITIVE_METRICS = (
    keras.metrics.Mean,
    keras.metrics.Sum,
    keras.metrics.AUC,
    keras.metrics.Precision,
    keras.metrics.Recall,
)


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
                "No learning rate bounds: run the LR range test (`cycleprune find-lr`) and pass "
                "its bounds (--min-lr/--max-lr), or set schedule.min_lr and schedule.max_lr. "
                "Received: "
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
    """The learning rate ``optimizer`` uses at global ``step`` (its schedule, or its constant).

    A ``LossScaleOptimizer`` (mixed precision) answers for the optimizer it wraps.
    """
    optimizer = precision.inner_optimizer(optimizer)
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(schedule(tf.constant(step, tf.int64)))
    return float(keras.backend.get_value(optimizer.learning_rate))


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow's kernels deterministic.

    Calls ``keras.utils.set_random_seed(seed)`` and
    ``tf.config.experimental.enable_op_determinism()``. Both are process-wide and cannot be
    undone: call this at the start of a stage's process (``train.deterministic``).
    """
    keras.utils.set_random_seed(int(seed) % 2**32)
    tf.config.experimental.enable_op_determinism()


def epoch_seed(seed: int, epoch: int) -> int:
    """The data seed of one training epoch: a function of ``(seed, epoch)`` only.

    ``np.random.SeedSequence([seed, epoch])`` hashed to an int below ``2**31 - 16``. The
    shuffle and the augmentation of epoch ``epoch`` use it, so that epoch's batches are the same
    however the run got there (in one go, or resumed from a checkpoint in a new process).

    Raises:
        ValueError: ``epoch`` < 0.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"Argument `epoch` must be an int >= 0. Received: {epoch=}")
    state = np.random.SeedSequence([int(seed) % 2**32, epoch]).generate_state(1)[0]
    return int(state) % _MAX_DATA_SEED


def epoch_batches(
    dataset_dir: str | os.PathLike,
    config: DataConfig,
    *,
    batch_size: int,
    class_weight: dict[int, float] | None = None,
) -> Callable[[int], tf.data.Dataset]:
    """``epoch -> training batches of that epoch``, for :func:`fit`.

    Each call builds ``data.make_dataset(dataset_dir, "train", ...)`` with ``batch_size`` (the
    global batch) and the seed :func:`epoch_seed(config.seed, epoch) <epoch_seed>`. When the
    split fits in memory, every epoch's pipeline starts from one shared in-memory cache
    (:func:`cycleprune.data.cached_records`), so the shards are read and parsed once per run,
    not once per epoch.

    Args:
        dataset_dir: A prepared dataset.
        config: Data settings (shuffle buffer, cache, augmentation, base seed).
        batch_size: Global batch size (per-replica batch times replicas).
        class_weight: Per-class sample weights, or ``None``.

    Returns:
        A function of the 0-based epoch.
    """
    from cycleprune import data

    records = data.cached_records(str(dataset_dir), "train", config)

    def make(epoch: int) -> tf.data.Dataset:
        settings = dataclasses.replace(
            config, batch_size=batch_size, seed=epoch_seed(config.seed, epoch)
        )
        return data.make_dataset(
            str(dataset_dir),
            "train",
            settings,
            training=True,
            class_weight=class_weight,
            records=records,
        )

    return make


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset | Callable[[int], tf.data.Dataset],
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
    handle_sigterm: bool = True,
    on_checkpoint: Callable[[], None] | None = None,
    steps_per_execution: int = 1,
    resume_key: dict[str, Any] | None = None,
) -> FitResult:
    """Compile and train ``model`` with checkpoints, exact resume, SIGTERM and divergence checks.

    If ``checkpoint_dir`` holds a checkpoint, the model and optimizer are restored from the latest
    one (so ``optimizer.iterations``, and with it any schedule of the step, continues) and
    training resumes at that checkpoint's epoch (and step, for a SIGTERM checkpoint); the earlier
    epochs' metrics are read back from their JSON entries. Epoch by epoch, ``model.fit`` trains
    on ``train_ds(epoch)`` (or ``train_ds``), ``val_ds`` is evaluated, the weights are checked
    to be finite, the epoch's entry (metrics, global step, LR, ``epoch_metadata(model)``) is
    written atomically as ``ckpt-<epoch>.json`` and then the checkpoint ``ckpt-<epoch>`` is saved,
    so a checkpoint never exists without its entry and never holds a non-finite weight.

    On SIGTERM (with ``handle_sigterm``, in the main thread) ``model.stop_training`` is set;
    ``fit`` returns after the call of the train function in progress (``steps_per_execution``
    steps at most), and the state of that exact step (model,
    optimizer, position in the epoch, the epoch's training-metric accumulators so far) is saved
    under ``partial/`` before :class:`~cycleprune.preemption.PreemptedError` is raised.
    Resuming from it skips the batches already done, and the epoch's entry reports metrics over
    the whole epoch (plus ``resumed_at_step``). A SIGKILL loses at most the epoch in progress.

    The model's distribution strategy (the one in scope when it was built) is used: build the
    model, the optimizer and the metrics inside ``strategy.scope()`` and batch the data at the
    global batch size (see :mod:`cycleprune.distribution`).

    Args:
        model: The model (built; compiled here).
        train_ds: Training batches ``(x, y)`` or ``(x, y, sample_weight)``, or a function
            ``epoch -> batches`` (see :func:`epoch_batches`): the same dataset every epoch cannot
            reproduce, after a resume, the order in which an uninterrupted run reshuffles it.
            An infinite dataset gives ``steps_per_epoch`` batches of a fresh iterator per epoch.
        val_ds: Validation batches, evaluated after every epoch, or ``None``.
        optimizer: The optimizer (its variables are built here, before any restore). For a
            mixed-precision model, a ``LossScaleOptimizer``
            (:func:`~cycleprune.precision.wrap_optimizer`); ``compile`` wraps a plain one, and
            the wrapper is what is trained and checkpointed. The wrapper skips a step whose
            scaled gradients overflow, and counts it in ``optimizer.iterations``; that is not
            divergence (the finite-loss check sees the unscaled loss).
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
        extra_callbacks: More Keras callbacks for ``model.fit``; their ``on_epoch_end`` runs
            before the checkpoint is written (e.g. tfmot's ``UpdatePruningStep``, which
            re-applies the masks at epoch end).
        epoch_metadata: ``model -> dict`` of extra JSON-able numbers stored in each entry.
        max_to_keep: Checkpoints kept on disk (``None`` = all). Entries are always kept.
        handle_sigterm: Install the SIGTERM handler while training.
        on_checkpoint: Called after every checkpoint written (each epoch's, and the SIGTERM one
            before PreemptedError is raised), e.g. to publish ``checkpoint_dir`` (see
            :func:`cycleprune.mirror.mirrored_dir`).
        steps_per_execution: Optimizer steps per call of the compiled train function (Keras'
            ``compile(steps_per_execution=...)``): the steps run in one graph loop, with no
            Python between them. The LR schedule, the finite-loss check and the metrics stay
            per step (they are in the graph); per-batch callback hooks run once per call, and
            a SIGTERM stops training after the call in progress (at most this many steps).
            Above 1, ``extra_callbacks`` with per-batch hooks and validation data of unknown
            length are refused (tfmot's ``UpdatePruningStep`` has no per-batch hook: the
            pruning wrappers count their step in the graph).
        resume_key: More JSON-able settings that a resumed run must share with the run that
            wrote the checkpoints (e.g. the dataset's version, the pruning target), beside
            ``steps_per_epoch``, the optimizer's configuration (its LR schedule included) and
            the loss's (``get_config()``), which are always compared. They are kept in
            ``checkpoint_dir/run.json``; resuming under different ones is refused, naming the
            setting, rather than continuing (or reporting) a schedule that the restored steps
            never followed.

    Returns:
        A :class:`FitResult`.

    Raises:
        DivergenceError: a non-finite loss (training or validation) or non-finite weights.
        cycleprune.preemption.PreemptedError: SIGTERM arrived; a checkpoint was written.
        ValueError: bad ``epochs``/``steps_per_epoch``, a dataset whose cardinality disagrees
            with ``steps_per_epoch``, a checkpoint that does not match the model, a checkpoint
            folder written under other settings (``resume_key``), or an epoch that ran out of
            data before ``steps_per_epoch`` steps.
    """
    for name, value in (
        ("epochs", epochs),
        ("steps_per_epoch", steps_per_epoch),
        ("steps_per_execution", steps_per_execution),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Argument `{name}` must be an int >= 1. Received: {name}={value!r}")
    if steps_per_execution > 1:
        for callback in extra_callbacks:
            # tf_keras' own test (CallbackList uses it to skip batch hooks nobody implements).
            if callback._implements_train_batch_hooks():
                raise ValueError(
                    f"{type(callback).__name__} runs after every batch, which happens once per "
                    f"{steps_per_execution} steps here; train with one step per call. Received: "
                    f"steps_per_execution={steps_per_execution}"
                )
        if val_ds is not None and int(val_ds.cardinality()) < 0:
            raise ValueError(
                "Keras cannot run several steps per call over validation data of unknown length; "
                "declare its length (tf.data.experimental.assert_cardinality) or train with one "
                f"step per call. Received: steps_per_execution={steps_per_execution}"
            )

    def batches(epoch: int) -> tf.data.Dataset:
        ds = train_ds(epoch) if callable(train_ds) else train_ds
        cardinality = int(ds.cardinality())
        if cardinality >= 0 and cardinality != steps_per_epoch:
            raise ValueError(
                f"Argument `steps_per_epoch` must match the training dataset's {cardinality} "
                f"batches. Received: steps_per_epoch={steps_per_epoch}"
            )
        if cardinality == tf.data.INFINITE_CARDINALITY:
            return ds.take(steps_per_epoch)
        if cardinality == tf.data.UNKNOWN_CARDINALITY:
            # tf_keras counts one extra optimizer step per epoch on a dataset of unknown length
            # (the end-of-data call), which would shift the LR schedule; declare the length.
            return ds.apply(tf.data.experimental.assert_cardinality(steps_per_epoch))
        return ds

    if not callable(train_ds):
        batches(0)  # fail on a wrong length before anything is built
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    with model.distribute_strategy.scope():
        model.compile(
            optimizer=optimizer,
            loss=FiniteLoss(loss),
            metrics=list(metrics) if metrics is not None else default_metrics(2),
            steps_per_execution=steps_per_execution,
        )
        optimizer = model.optimizer  # compile wraps a plain optimizer for a mixed_float16 model
        # Create the slot variables now so that a restore fills them instead of deferring.
        optimizer.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(
        checkpoint, str(checkpoint_dir), max_to_keep=max_to_keep, checkpoint_name=CHECKPOINT_NAME
    )
    partial = _PartialCheckpoint(checkpoint, checkpoint_dir / PARTIAL_DIR)

    latest = _restore_latest(checkpoint, manager)
    initial_epoch = int(epoch_var.numpy()) if latest else 0
    state = partial.read(initial_epoch, steps_per_epoch)
    key = _run_key(optimizer, loss, steps_per_epoch, resume_key)
    _check_run_key(checkpoint_dir, key, resuming=bool(latest) or state is not None)
    offset, carried = 0, None
    if state is not None:
        try:
            _restore(checkpoint, state["checkpoint"])
        except _UnreadableCheckpointError as err:
            logger.warning("Skipping unreadable checkpoint %s: %s", state["checkpoint"], err)
            partial.clear()
            state = None
            if latest:  # the failed read may have overwritten some variables
                _restore(checkpoint, latest)
    if state is not None:
        offset, carried = int(state["step_in_epoch"]), state.get("metrics")
        logger.info(
            "Resuming from %s at epoch %d, step %d of %d",
            state["checkpoint"],
            initial_epoch + 1,
            offset,
            steps_per_epoch,
        )
    elif latest:
        logger.info("Resuming from %s at epoch %d", latest, initial_epoch)
    expected = initial_epoch * steps_per_epoch + offset
    if int(optimizer.iterations.numpy()) != expected:
        raise ValueError(
            f"{checkpoint_dir}: the checkpoint is at step {int(optimizer.iterations.numpy())}, "
            f"but {initial_epoch} epochs of {steps_per_epoch} steps (+{offset}) make {expected}: "
            f"the data, batch size or replica count changed since it was written. Resume with "
            f"the same settings, or train into a new checkpoint folder."
        )
    previous = [e for e in read_entries(checkpoint_dir) if e["epoch"] <= initial_epoch]

    recorder = _Recorder(
        checkpoint_dir=checkpoint_dir,
        manager=manager,
        partial=partial,
        epoch_var=epoch_var,
        tensorboard_dir=tensorboard_dir,
        epoch_metadata=epoch_metadata,
        on_checkpoint=on_checkpoint,
    )
    guard = SigtermGuard() if handle_sigterm else contextlib.nullcontext(_NoGuard())
    try:
        with guard as sigterm:
            sigterm.watch(model)
            callbacks = [_StopIfRequested(sigterm), *extra_callbacks]
            for epoch in range(initial_epoch, epochs):
                skip = offset if epoch == initial_epoch else 0
                if sigterm.requested:
                    raise PreemptedError(int(optimizer.iterations.numpy()), recorder.last_good())
                ds = batches(epoch)
                model.fit(
                    ds.skip(skip) if skip else ds,
                    epochs=epoch + 1,
                    initial_epoch=epoch,
                    callbacks=callbacks,
                    verbose=0,
                )
                step = int(optimizer.iterations.numpy())
                done = step - epoch * steps_per_epoch
                if carried:
                    _add_metric_state(model, carried)
                if done < steps_per_epoch and not sigterm.requested:
                    raise ValueError(
                        f"Epoch {epoch + 1} ran out of training data after {done} of "
                        f"{steps_per_epoch} steps: the dataset is shorter than steps_per_epoch"
                    )
                if done < steps_per_epoch:  # stopped by SIGTERM
                    _check_finite(model, optimizer, recorder.last_good())
                    path = partial.save(
                        epoch=epoch,
                        global_step=step,
                        step_in_epoch=done,
                        metrics=_metric_state(model),
                    )
                    recorder.close()  # flush the TensorBoard scalars before publishing
                    if on_checkpoint is not None:
                        on_checkpoint()
                    raise PreemptedError(step, path)
                logs = {k: float(v) for k, v in model.get_metrics_result().items()}
                if val_ds is not None:
                    evaluated = model.evaluate(val_ds, verbose=0, return_dict=True)
                    logs.update({f"val_{k}": float(v) for k, v in evaluated.items()})
                if skip:
                    logs["resumed_at_step"] = skip
                recorder.epoch_end(model, epoch, logs)
                carried = None
    except tf.errors.InvalidArgumentError as err:
        if _NONFINITE_TAG not in str(err):
            raise
        step = int(optimizer.iterations.numpy())
        raise DivergenceError(
            step, learning_rate_at(optimizer, step), recorder.last_good()
        ) from None
    finally:
        recorder.close()
    if initial_epoch >= epochs:
        logger.warning(
            "%s is already at epoch %d of %d: nothing to train.", latest, initial_epoch, epochs
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


def _run_key(
    optimizer: keras.optimizers.Optimizer,
    loss: Any,
    steps_per_epoch: int,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The settings a resume must share (see ``fit``'s ``resume_key``), as plain JSON values."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's own
    config = dict(inner.get_config())
    for name in ("name", "jit_compile"):  # jit_compile follows the device (GPU or not)
        config.pop(name, None)
    # The loss (focal or cross-entropy, gamma, alpha, label smoothing) shapes every step too.
    loss_config = (
        {"class": type(loss).__name__, **loss.get_config()}
        if isinstance(loss, keras.losses.Loss)
        else {"name": str(loss)}
    )
    key = {
        "steps_per_epoch": steps_per_epoch,
        "optimizer": config,
        "loss": loss_config,
        **(extra or {}),
    }
    return storage.to_json_value(key)


def _check_run_key(checkpoint_dir: Path, key: dict[str, Any], *, resuming: bool) -> None:
    """Refuse to resume checkpoints written under other settings; record them for a new run."""
    path = checkpoint_dir / RUN_KEY_FILE
    if resuming and path.is_file():
        stored = storage.read_json(path)
        skipped: list[str] = []
        difference = _first_difference(stored, key, skipped=skipped)
        if skipped and difference is None:
            logger.warning(
                "%s was written by an older cycleprune that did not record %s: resuming without "
                "comparing them",
                path,
                ", ".join(skipped),
            )
        if difference is not None:
            field, old, new = difference
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of a run with {field}={_json_text(old)}, "
                f"but this run has {field}={_json_text(new)} (per {path}): resume with the same "
                f"settings, or train into a new checkpoint folder"
            )
        return
    storage.atomic_write_json(path, key)  # a new run (or one that wrote no checkpoint yet)


# Settings older cycleprune versions did not record, with the value they always had then.
_IMPLIED = {"model.arch": "vgg", "model.bn_momentum": 0.99}


def _first_difference(
    old: Any, new: Any, path: str = "", *, skipped: list[str] | None = None
) -> tuple[str, Any, Any] | None:
    """``(dotted field, old value, new value)`` of the first leaf that differs, or ``None``.

    A field the stored key ``old`` does not have was not recorded by an older cycleprune: it is
    compared with the value it always had then (:data:`_IMPLIED`), or else not compared (and
    appended to ``skipped``), as checkpoints with no ``run.json`` at all still resume.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        for name in [*new, *(n for n in old if n not in new)]:  # steps_per_epoch first
            field = f"{path}.{name}".lstrip(".")
            if name in old:
                stored = old[name]
            elif field in _IMPLIED:
                stored = _IMPLIED[field]
            else:
                if skipped is not None:
                    skipped.append(field)
                continue
            found = _first_difference(stored, new.get(name), field, skipped=skipped)
            if found is not None:
                return found
        return None
    return None if old == new else (path, old, new)


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


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
    strategy: tf.distribute.Strategy | None = None,
) -> TrainResult:
    """Train the configured model under a cyclical learning rate (Smith 2017).

    The LR follows ``CyclicalLearningRate(min_lr, max_lr, step_size)`` with
    ``step_size = clr_step_size(steps_per_epoch, schedule.step_size_epochs)``, evaluated in the
    graph from ``optimizer.iterations``. Epochs are ``train.epochs``, rounded up to whole cycles
    when ``train.whole_cycles``. Training batches carry per-example weights from
    ``data.class_weights``. Calling again with the same ``checkpoint_dir`` resumes (see
    :func:`fit`); a larger ``train.epochs`` extends a finished run.

    Data-parallel on one machine: the model, optimizer and metrics are built in
    ``strategy.scope()``; a step consumes a global batch of ``data.batch_size * replicas``
    images, so ``steps_per_epoch = ceil(n_train / global_batch)`` and the CLR ``step_size`` (in
    steps) keeps its length in epochs whatever the number of replicas.

    Writes ``out_dir/model.keras`` (weights and architecture, no optimizer or compile state; load
    with ``models.load_model``), ``out_dir/history.json`` and ``out_dir/tensorboard/``, each
    appearing atomically. ``history.json`` holds ``epochs`` (one dict per epoch, see
    :class:`FitResult`), ``lr`` (the LR of every step ``0..global_step-1``, from the closed form
    :func:`cycleprune.schedules.clr`), ``min_lr``, ``max_lr``, ``step_size``, ``policy``,
    ``gamma``, ``num_epochs``, ``steps_per_epoch``, ``global_step``, ``replicas``,
    ``global_batch_size`` and ``precision``.

    Precision: ``train.precision`` resolved by :func:`cycleprune.precision.stage_precision`
    (``auto``: ``mixed_float16`` on GPUs of compute capability >= 7.0, else ``float32``; a
    resumed float32 run stays float32). Under ``mixed_float16`` the model is built, and trained,
    inside :func:`cycleprune.precision.policy_scope` (the previous global policy is restored
    afterwards) with a ``LossScaleOptimizer``; ``model.keras`` is float32 either way
    (:func:`save_model`).

    Args:
        dataset_dir: A prepared dataset (train and val splits).
        out_dir: Output folder.
        config: The run configuration (``train.deterministic`` seeds everything and makes the
            kernels deterministic, process-wide: see :func:`enable_determinism`).
        min_lr, max_lr: CLR bounds (e.g. from the LR range test); default: the config's.
        checkpoint_dir: Checkpoint folder or ``gs://bucket/prefix`` (worked on in a local copy,
            published after every checkpoint: see :func:`cycleprune.mirror.mirrored_dir`);
            default ``out_dir/checkpoints``.
        strategy: Distribution strategy; default
            :func:`cycleprune.distribution.select_strategy` (all visible GPUs).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: no LR bounds (run the LR range test or set schedule.min_lr/max_lr), or
            invalid ones.
        DivergenceError: the loss or the weights became non-finite.
        cycleprune.preemption.PreemptedError: SIGTERM; a checkpoint was written, rerun to resume.
        cycleprune.data.DataError: a bad dataset.
    """
    from cycleprune import mirror

    args = (dataset_dir, out_dir, config, min_lr, max_lr)
    if checkpoint_dir is not None and storage.is_gcs(checkpoint_dir):
        with mirror.mirrored_dir(checkpoint_dir) as local:
            return _run_training(*args, local.path, strategy, local.sync)
    return _run_training(*args, checkpoint_dir, strategy, None)


def _run_training(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
    min_lr: float | None,
    max_lr: float | None,
    checkpoint_dir: str | os.PathLike | None,
    strategy: tf.distribute.Strategy | None,
    on_checkpoint: Callable[[], None] | None,
) -> TrainResult:
    from cycleprune import data, distribution, losses, models, schedules

    low, high = resolve_lr_bounds(config.schedule, min_lr, max_lr)
    if config.train.deterministic:
        enable_determinism(config.train.seed)
    strategy = strategy if strategy is not None else distribution.select_strategy()
    global_batch = distribution.global_batch_size(config.data.batch_size, strategy)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    info = data.load_info(str(dataset_dir), verify=True)
    epochs = training_epochs(config.train, config.schedule)
    class_weight = data.class_weights(info, config.data)
    train_batches = epoch_batches(
        dataset_dir, config.data, batch_size=global_batch, class_weight=class_weight
    )
    val_config = dataclasses.replace(config.data, batch_size=global_batch)
    val_ds = data.make_dataset(str(dataset_dir), "val", val_config, training=False)
    steps = steps_per_epoch(train_batches(0), info.num_examples("train"), global_batch)
    step_size = schedules.clr_step_size(steps, config.schedule.step_size_epochs)
    if config.train.whole_cycles and not schedules.ends_on_cycle_minimum(epochs, steps, step_size):
        # Whole cycles are counted in epochs, the half cycle rounds to whole steps: with a
        # fractional step_size_epochs the two need not meet.
        logger.warning(
            "train.whole_cycles: %d epochs of %d steps do not end on a cycle minimum (the half "
            "cycle is %d steps, schedule.step_size_epochs=%s); choose a step size whose half "
            "cycle is a whole number of epochs to end at min_lr.",
            epochs,
            steps,
            step_size,
            config.schedule.step_size_epochs,
        )
    logger.info(
        "Training %d epochs x %d steps of %d images (%d replica(s)), CLR %.3g..%.3g (%s, step "
        "size %d)",
        epochs,
        steps,
        global_batch,
        distribution.replicas(strategy),
        low,
        high,
        config.schedule.policy,
        step_size,
    )

    used = precision.stage_precision(
        config.train.precision, [checkpoint_dir, checkpoint_dir / PARTIAL_DIR]
    )
    logger.info("Training in %s (train.precision=%s)", used, config.train.precision)

    with precision.policy_scope(used):
        with strategy.scope():
            model = models.build_model(
                config.model, info.image_shape, info.num_classes, seed=config.train.seed
            )
            optimizer = precision.wrap_optimizer(
                schedules.make_optimizer(
                    config.train, config.schedule, min_lr=low, max_lr=high, steps_per_epoch=steps
                ),
                used,
            )
            metrics = default_metrics(info.num_classes, config.evaluate.positive_class)
        result = fit(
            model,
            train_batches,
            val_ds,
            optimizer=optimizer,
            loss=losses.make_loss(config.train),
            epochs=epochs,
            steps_per_epoch=steps,
            checkpoint_dir=checkpoint_dir,
            tensorboard_dir=checkpoint_dir / TENSORBOARD_DIR,
            metrics=metrics,
            max_to_keep=TRAIN_CHECKPOINTS_TO_KEEP,
            on_checkpoint=on_checkpoint,
            steps_per_execution=config.train.steps_per_execution,
            # The model's and the input's settings shape every step but live in no checkpoint
            # (BatchNorm momentum, dropout, augmentation, class weights).
            resume_key={
                "dataset": info.version,
                "model": dataclasses.asdict(config.model),
                "data": dataclasses.asdict(config.data),
            },
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
        "replicas": distribution.replicas(strategy),
        "global_batch_size": global_batch,
        "precision": used,
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
    """Write ``history.json``, a copy of the TensorBoard logs and ``model.keras``, each atomically.

    ``model.keras``, what the next stage takes, comes last: a failure before it leaves no model
    beside an incomplete record. The model is saved as an uncompiled copy (architecture and
    weights; no optimizer, loss or metrics), so loading it never needs the training-time classes.

    Returns:
        The path of ``model.keras``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_json(out_dir / "history.json", history)
    if tensorboard_src is not None and Path(tensorboard_src).is_dir():
        # _ScalarWriter's layout: every log folder has train/.
        with storage.atomic_dir(out_dir / TENSORBOARD_DIR, replaces="train") as tmp:
            shutil.copytree(tensorboard_src, tmp, dirs_exist_ok=True)
    return save_model(model, out_dir / "model.keras")


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Save an uncompiled float32 copy of ``model`` to ``path`` (``.keras``) atomically.

    The copy computes in float32 whatever precision ``model`` was trained in
    (:func:`cycleprune.precision.to_float32`), so the next stages (pruning, TFLite, CPU
    evaluation) load a float32 model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export = precision.to_float32(model)
    tmp = path.with_name(f"{storage.TMP_PREFIX}{path.stem}.{os.getpid()}{path.suffix}")
    try:
        export.save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
            if name in ("epoch", "resumed_at_step"):
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


class _NoGuard:
    """Stands in for :class:`SigtermGuard` when SIGTERM handling is off."""

    requested = False

    def watch(self, model: keras.Model) -> None:
        pass


class _StopIfRequested(keras.callbacks.Callback):
    """``fit`` clears ``stop_training`` when it starts: set it again if SIGTERM came before."""

    def __init__(self, guard: Any) -> None:
        super().__init__()
        self.guard = guard

    def on_train_begin(self, logs=None):
        if self.guard.requested:
            self.model.stop_training = True


class _Recorder:
    """After each epoch: finite-weights check, JSON entry, checkpoint, TensorBoard scalars."""

    def __init__(
        self,
        *,
        checkpoint_dir: Path,
        manager: tf.train.CheckpointManager,
        partial: _PartialCheckpoint,
        epoch_var: tf.Variable,
        tensorboard_dir: str | os.PathLike | None,
        epoch_metadata: Callable[[keras.Model], dict] | None,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.on_checkpoint = on_checkpoint
        self.manager = manager
        self.partial = partial
        self.epoch_var = epoch_var
        self.epoch_metadata = epoch_metadata
        self.entries: list[dict] = []
        self._writer = _ScalarWriter(tensorboard_dir) if tensorboard_dir is not None else None

    def last_good(self) -> str | None:
        """The newest checkpoint on disk: a SIGTERM one if newer than the last epoch's."""
        return self.partial.path or self.manager.latest_checkpoint

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def epoch_end(self, model: keras.Model, epoch: int, logs: dict) -> None:
        optimizer = model.optimizer
        step = int(optimizer.iterations.numpy())
        _check_finite(model, optimizer, self.last_good())
        number = epoch + 1
        lr = float(optimizer.learning_rate.numpy())  # the LR of the epoch's last step
        entry: dict[str, Any] = {"epoch": number, "global_step": step, "lr": lr}
        entry.update(logs)
        momentum_schedule = getattr(precision.inner_optimizer(optimizer), "momentum_schedule", None)
        if momentum_schedule is not None:  # cyclical momentum: the value of the last step
            entry["momentum"] = float(momentum_schedule(step - 1))
        if self.epoch_metadata is not None:
            entry.update(self.epoch_metadata(model))
        storage.atomic_write_json(self.checkpoint_dir / f"{CHECKPOINT_NAME}-{number}.json", entry)
        self.epoch_var.assign(number)
        path = self.manager.save(checkpoint_number=number)
        self.partial.clear()  # superseded (only now: until the save, it was the newest state)
        self.entries.append(entry)
        if self._writer is not None:
            self._writer.write(entry, step=epoch)
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        logger.info(
            "epoch %d step %d lr %.4g %s -> %s",
            number,
            step,
            lr,
            " ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, float)),
            path,
        )


class _PartialCheckpoint:
    """The one mid-epoch (SIGTERM) checkpoint: ``partial/step-<step>`` + ``partial/state.json``.

    ``state.json`` is written after the checkpoint, so it only ever names a complete one; it
    records the epoch the checkpoint belongs to (epochs completed before it), the step and the
    training metrics' accumulators. A state whose epoch is not the one the epoch checkpoints
    have reached is stale (the epoch was completed after it) and is removed.
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, folder: Path) -> None:
        self.checkpoint = checkpoint
        self.folder = folder
        self.path: str | None = None

    def read(self, epoch: int, steps_per_epoch: int) -> dict | None:
        state_path = self.folder / PARTIAL_STATE
        if not state_path.is_file():
            return None
        try:
            state = storage.read_json(state_path)
            path = str(self.folder / state["checkpoint"])
            usable = (
                int(state["epoch"]) == epoch
                and 0 < int(state["step_in_epoch"]) < steps_per_epoch
                and tf.io.gfile.exists(f"{path}.index")
            )
        except (ValueError, KeyError, TypeError) as err:
            logger.warning("Ignoring an unreadable %s: %s", state_path, err)
            usable = False
        if not usable:
            logger.info("Removing a stale mid-epoch checkpoint in %s", self.folder)
            self.clear()
            return None
        self.path = path
        return {**state, "checkpoint": path}

    def save(self, *, epoch: int, global_step: int, step_in_epoch: int, metrics: dict) -> str:
        self.clear()
        manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.folder), max_to_keep=1, checkpoint_name=PARTIAL_NAME
        )
        path = manager.save(checkpoint_number=global_step)
        state = {
            "epoch": epoch,
            "global_step": global_step,
            "step_in_epoch": step_in_epoch,
            "checkpoint": Path(path).name,
            "metrics": metrics,
        }
        storage.atomic_write_json(self.folder / PARTIAL_STATE, state)
        self.path = path
        logger.warning("Saved a mid-epoch checkpoint at step %d: %s", global_step, path)
        return path

    def clear(self) -> None:
        self.path = None
        with contextlib.suppress(FileNotFoundError):
            (self.folder / PARTIAL_STATE).unlink()  # first: what remains is then ignored
        shutil.rmtree(self.folder, ignore_errors=True)


def _check_finite(model: keras.Model, optimizer: Any, last_good: str | None) -> None:
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        step = int(optimizer.iterations.numpy())
        raise DivergenceError(
            step, learning_rate_at(optimizer, max(step - 1, 0)), last_good, what="weights"
        )


def _metric_state(model: keras.Model) -> dict[str, list]:
    """The accumulators of the additive training metrics, as JSON-able nested lists."""
    return {
        m.name: [np.asarray(v.numpy()).tolist() for v in m.variables]
        for m in model.metrics
        if isinstance(m, _ADDITIVE_METRICS)
    }


def _add_metric_state(model: keras.Model, state: dict[str, list]) -> None:
    """Add a saved partial-epoch state to the metrics' accumulators (see _ADDITIVE_METRICS)."""
    for metric in model.metrics:
        saved = state.get(metric.name)
        if saved is None or not isinstance(metric, _ADDITIVE_METRICS):
            logger.warning(
                "Training metric %r of the resumed epoch covers only the steps after the resume.",
                metric.name,
            )
            continue
        for variable, value in zip(metric.variables, saved, strict=True):
            variable.assign(variable.numpy() + np.asarray(value, variable.dtype.as_numpy_dtype))


def _restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager) -> str:
    """Restore the newest readable epoch checkpoint; ``""`` when there is none.

    Raises:
        ValueError: there are checkpoints but none is readable (or one does not match).
    """
    for path in reversed(manager.checkpoints):
        try:
            _restore(checkpoint, path)
        except _UnreadableCheckpointError as err:
            logger.warning("Skipping unreadable checkpoint %s: %s", path, err)
            continue
        return path
    if manager.checkpoints:
        raise ValueError(
            f"No checkpoint in {manager.directory} is readable (damaged files): remove them to "
            "start afresh."
        )
    return ""


class _UnreadableCheckpointError(Exception):
    """A checkpoint's files are missing or damaged (as opposed to not matching the model)."""


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    try:
        status = checkpoint.restore(path)
    except (
        tf.errors.NotFoundError,
        tf.errors.DataLossError,
        tf.errors.OutOfRangeError,
        IndexError,  # the checkpoint reader's translation of a truncated data file
    ) as err:
        raise _UnreadableCheckpointError(str(err).splitlines()[0]) from None
    except (ValueError, tf.errors.OpError) as err:
        raise ValueError(
            f"Checkpoint {path} does not match this model and optimizer (use an empty "
            f"checkpoint_dir for a new run): {err}"
        ) from None
    try:
        status.assert_existing_objects_matched().expect_partial()
    except AssertionError as err:
        raise ValueError(
            f"Checkpoint {path} does not match this model and optimizer (use an empty "
            f"checkpoint_dir for a new run): {err}"
        ) from None


def _checkpoint_epoch(path: str) -> int:
    return int(path.rsplit("-", 1)[-1])


def _without_checkpoint(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "checkpoint"}
