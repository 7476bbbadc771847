"""Magnitude pruning with tfmot, fine-tuned under the cyclical learning rate.

Layers, bottom up: :func:`scheduled_sparsity` is the pruning schedule in numpy (the reference for
history and plots); :func:`pruning_schedule` builds the matching tfmot schedule;
:func:`prune_model` wraps the prunable layers (``Conv2D``, ``Dense``) of a copy of a model;
:func:`strip`, :func:`sparsity_report` and :func:`overall_sparsity` undo the wrapping and
measure the result; :func:`select_checkpoint` is the pure rule that picks the checkpoint to keep;
and :func:`run_pruning` is the stage: load, prune, fine-tune with :func:`cycleprune.training.fit`
(same checkpoints, resume, divergence check and history as training), pick, strip, write.

Magnitude pruning zeroes the smallest-magnitude weights of each layer, raising the sparsity
gradually while training continues (Zhu & Gupta, "To prune, or not to prune: exploring the
efficacy of pruning for model compression", 2017, https://arxiv.org/abs/1710.01878). With
``prune.m_by_n = "m:n"`` the structure is instead ``m`` zeros in every ``n`` consecutive input
channels of a kernel (e.g. 2:4, which sparse tensor cores and XNNPack exploit); tfmot applies that
mask once, at the first fine-tuning step, whatever the schedule says.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import precision, storage
from cycleprune.compat import keras, tf
from cycleprune.config import Config, PruneConfig

logger = logging.getLogger(__name__)

PRUNABLE_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
POLYNOMIAL_POWER = 3  # tfmot's PolynomialDecay default, as in Zhu & Gupta (2017)
DEFAULT_TOLERANCE = 0.01


@dataclasses.dataclass
class PruneResult:
    """What :func:`run_pruning` produced.

    Attributes:
        model_path: ``out_dir/model.keras`` (stripped: plain Keras layers with zeroed weights).
        history: The content of ``out_dir/history.json``.
        sparsity: Overall sparsity of the saved model (zeros / weights over Conv2D and Dense
            kernels).
        layer_sparsity: ``{layer name: sparsity of its kernel}``.
        best_checkpoint: The chosen checkpoint's entry (see :func:`select_checkpoint`); its
            ``checkpoint`` is the checkpoint's name in the checkpoint folder (``ckpt-<n>``; for a
            ``gs://`` folder, in its newest mirror slot), not a path into a local working copy.
        warnings: Human-readable problems, e.g. the target sparsity was not reached.
    """

    model_path: str
    history: dict
    sparsity: float
    layer_sparsity: dict
    best_checkpoint: dict
    warnings: list = dataclasses.field(default_factory=list)


def parse_m_by_n(text: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``""`` -> ``None``.

    Raises:
        ValueError: not ``"m:n"`` with ``0 < m < n``.
    """
    if not text:
        return None
    parts = text.split(":")
    if (
        len(parts) != 2
        or not all(p.isdigit() for p in parts)
        or not 0 < int(parts[0]) < int(parts[1])
    ):
        raise ValueError(f"Argument `m_by_n` must look like '2:4' (0 < m < n). Received: {text!r}")
    return int(parts[0]), int(parts[1])


def _target(config: PruneConfig, final_sparsity: float | None) -> float:
    target = config.final_sparsity if final_sparsity is None else float(final_sparsity)
    if not 0 <= target < 1:
        raise ValueError(
            f"Argument `final_sparsity` must be in [0, 1). Received: final_sparsity={target}"
        )
    if config.schedule == "polynomial" and config.initial_sparsity > target:
        raise ValueError(
            f"Argument `final_sparsity` must be >= prune.initial_sparsity "
            f"({config.initial_sparsity}). Received: final_sparsity={target}"
        )
    return target


def _check_steps(steps_per_epoch: int) -> None:
    if (
        isinstance(steps_per_epoch, bool)
        or not isinstance(steps_per_epoch, int)
        or (steps_per_epoch < 1)
    ):
        raise ValueError(
            f"Argument `steps_per_epoch` must be an int >= 1. Received: {steps_per_epoch=}"
        )


def pruning_schedule(
    config: PruneConfig, *, steps_per_epoch: int, final_sparsity: float | None = None
):
    """The tfmot pruning schedule a ``PruneConfig`` asks for, in optimizer steps.

    ``polynomial``: ``PolynomialDecay(initial_sparsity, final, begin_step, end_step, power=3,
    frequency)`` with ``begin_step = begin_epoch * steps_per_epoch`` and ``end_step =
    end_epoch * steps_per_epoch``; ``constant``: ``ConstantSparsity(final, begin_step,
    frequency=frequency)`` (pruning continues every ``frequency`` steps until the end).

    Args:
        config: The pruning config.
        steps_per_epoch: Optimizer steps per fine-tuning epoch.
        final_sparsity: Overrides ``config.final_sparsity``.

    Returns:
        A ``tfmot.sparsity.keras.PruningSchedule``.

    Raises:
        ValueError: bad ``steps_per_epoch`` or ``final_sparsity``.
    """
    import tensorflow_model_optimization as tfmot

    _check_steps(steps_per_epoch)
    target = _target(config, final_sparsity)
    begin = config.begin_epoch * steps_per_epoch
    sparsity = tfmot.sparsity.keras
    if config.schedule == "constant":
        return sparsity.ConstantSparsity(target, begin_step=begin, frequency=config.frequency)
    return sparsity.PolynomialDecay(
        initial_sparsity=config.initial_sparsity,
        final_sparsity=target,
        begin_step=begin,
        end_step=config.end_epoch * steps_per_epoch,
        power=POLYNOMIAL_POWER,
        frequency=config.frequency,
    )


def scheduled_sparsity(
    num_steps: int,
    config: PruneConfig,
    *,
    steps_per_epoch: int,
    final_sparsity: float | None = None,
) -> np.ndarray:
    """Sparsity of the pruning masks after each optimizer step ``0..num_steps-1`` (pure numpy).

    tfmot counts its own step ``u = t + 1`` during optimizer step ``t`` and, when
    ``u >= begin`` and ``(u - begin) % frequency == 0`` (and ``u <= end`` for ``polynomial``),
    sets the masks to the schedule's sparsity::

        p = clip((u - begin) / (end - begin), 0, 1)
        polynomial: s(u) = final + (initial - final) * (1 - p)**3
        constant:   s(u) = final

    Between updates the masks keep their sparsity; before the first update it is 0. So the
    target is reached exactly when ``end - begin`` is a multiple of ``frequency``.

    Args:
        num_steps: Number of optimizer steps.
        config: The pruning config (``m_by_n`` is ignored here: see :func:`run_pruning`).
        steps_per_epoch: Optimizer steps per epoch.
        final_sparsity: Overrides ``config.final_sparsity``.

    Returns:
        float64 array of length ``num_steps``.
    """
    _check_steps(steps_per_epoch)
    target = _target(config, final_sparsity)
    begin = config.begin_epoch * steps_per_epoch
    end = config.end_epoch * steps_per_epoch
    if num_steps <= 0:
        return np.zeros(0, dtype=np.float64)
    u = np.arange(1, num_steps + 1, dtype=np.int64)
    prune_now = (u >= begin) & ((u - begin) % config.frequency == 0)
    if config.schedule == "constant":
        values = np.full(num_steps, target, dtype=np.float64)
    else:
        prune_now &= u <= end
        p = np.clip((u - begin) / max(end - begin, 1), 0.0, 1.0)
        values = target + (config.initial_sparsity - target) * (1.0 - p) ** POLYNOMIAL_POWER
    last = np.maximum.accumulate(np.where(prune_now, np.arange(num_steps), -1))
    return np.where(last >= 0, values[np.maximum(last, 0)], 0.0).astype(np.float64)


def prune_model(
    model: keras.Model,
    config: PruneConfig,
    *,
    steps_per_epoch: int,
    final_sparsity: float | None = None,
) -> keras.Model:
    """A copy of ``model`` whose ``Conv2D`` and ``Dense`` layers are wrapped for pruning.

    The copy has its own weights (equal to ``model``'s); ``model`` is left untouched. Only
    ``Conv2D`` and ``Dense`` layers are wrapped with ``tfmot.sparsity.keras.prune_low_magnitude``
    (schedule: :func:`pruning_schedule`); every other layer (rescaling, resizing, BatchNorm,
    pooling) stays as it is. With ``config.m_by_n = "m:n"`` the wrappers use
    ``sparsity_m_by_n=(m, n)``, and a layer whose kernel's input-channel count is not a multiple
    of ``n`` (e.g. the first convolution of a grayscale model) is left unwrapped, with a logged
    message, and so is a layer whose kernel has fewer than ``config.min_weights`` weights. Train
    the result with ``tfmot.sparsity.keras.UpdatePruningStep``.

    Args:
        model: A functional or Sequential Keras model.
        config: The pruning config.
        steps_per_epoch: Optimizer steps per epoch (the schedule is in steps).
        final_sparsity: Overrides ``config.final_sparsity``.

    Returns:
        The wrapped, uncompiled model.

    Raises:
        ValueError: bad arguments, or a subclassed model.
    """
    import tensorflow_model_optimization as tfmot

    if not isinstance(model, keras.Model):
        raise ValueError(f"Argument `model` must be a keras.Model. Received: {type(model)}")
    schedule = pruning_schedule(
        config, steps_per_epoch=steps_per_epoch, final_sparsity=final_sparsity
    )
    m_by_n = parse_m_by_n(config.m_by_n)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.Model):  # a nested model: wrap inside it
            return keras.models.clone_model(layer, clone_function=wrap)
        if not isinstance(layer, PRUNABLE_LAYERS) or _is_wrapper(layer):
            return layer
        if int(np.prod(layer.kernel.shape)) < config.min_weights:
            logger.info(
                "Not pruning layer %s: its kernel has %d weights, fewer than prune.min_weights=%d.",
                layer.name,
                int(np.prod(layer.kernel.shape)),
                config.min_weights,
            )
            return layer
        if m_by_n is not None:
            channels = int(layer.kernel.shape[-2])
            if channels % m_by_n[1]:
                logger.info(
                    "Not pruning layer %s with %d:%d sparsity: its %d input channels are not a "
                    "multiple of %d.",
                    layer.name,
                    m_by_n[0],
                    m_by_n[1],
                    channels,
                    m_by_n[1],
                )
                return layer
        return tfmot.sparsity.keras.prune_low_magnitude(
            layer, pruning_schedule=schedule, sparsity_m_by_n=m_by_n
        )

    try:
        return keras.models.clone_model(copy, clone_function=wrap)
    except ValueError as err:
        raise ValueError(f"Cannot prune model {model.name!r}: {err}") from err


def strip(model: keras.Model) -> keras.Model:
    """Remove the pruning wrappers (``tfmot.sparsity.keras.strip_pruning``), masks applied first.

    The masks are multiplied into the kernels before stripping, so the result computes exactly
    what the wrapped model computes even if an optimizer step ran after the last re-masking.
    The stripped model shares its variables with ``model``.

    Returns:
        A model of plain Keras layers with the same outputs as ``model``.
    """
    import tensorflow_model_optimization as tfmot

    for wrapper in _wrappers(model):
        wrapper.pruning_obj.weight_mask_op()
    return tfmot.sparsity.keras.strip_pruning(model)


def sparsity_report(model: keras.Model) -> dict[str, float]:
    """Fraction of zeros in each ``Conv2D``/``Dense`` kernel, wrapped (masked) or not.

    Args:
        model: A pruned (wrapped) or stripped model; nested models are searched.

    Returns:
        ``{layer name: zeros / kernel size}``, by the unwrapped layer's name, in layer order.
    """
    return {name: float(np.mean(kernel == 0)) for name, kernel in _kernels(model)}


def overall_sparsity(model: keras.Model) -> float:
    """Zeros / weights over all ``Conv2D`` and ``Dense`` kernels of ``model`` (0 if none)."""
    kernels = [kernel for _, kernel in _kernels(model)]
    total = sum(k.size for k in kernels)
    return float(sum(int(np.sum(k == 0)) for k in kernels) / total) if total else 0.0


def expected_sparsity(model: keras.Model, final_sparsity: float, m_by_n: str = "") -> float:
    """Overall sparsity that full pruning of ``model``'s wrapped layers gives.

    Each wrapped kernel reaches ``final_sparsity`` (unstructured) or ``m / n`` (``m_by_n``);
    unwrapped kernels (skipped by :func:`prune_model`) stay dense.
    """
    structure = parse_m_by_n(m_by_n)
    per_layer = final_sparsity if structure is None else structure[0] / structure[1]
    wrapped = {w.layer.name for w in _wrappers(model)}
    sizes = [(name in wrapped, kernel.size) for name, kernel in _kernels(model)]
    total = sum(size for _, size in sizes)
    if not total:
        return 0.0
    return float(sum(size for is_wrapped, size in sizes if is_wrapped) * per_layer / total)


def select_checkpoint(
    entries: Sequence[Mapping[str, Any]], target: float, tolerance: float = DEFAULT_TOLERANCE
) -> dict:
    """Pick the fine-tuning checkpoint to keep (pure).

    Rule: among the entries whose ``sparsity`` is within ``tolerance`` (absolute, 0.01 = one
    percentage point) of ``target``, the one with the highest ``val_auc``, ties broken by the
    highest ``val_accuracy``, then by the later ``epoch``. If no entry is within the tolerance,
    the last one (highest ``epoch``), flagged ``reached_target=False``. Missing or NaN metrics
    rank lowest.

    Args:
        entries: Per-checkpoint dicts with ``epoch``, ``sparsity`` and the validation metrics.
        target: Target overall sparsity.
        tolerance: Allowed ``|sparsity - target|``.

    Returns:
        A copy of the chosen entry with ``reached_target`` (bool) added.

    Raises:
        ValueError: no entries, or a bad ``target``/``tolerance``.
    """
    if not entries:
        raise ValueError("Argument `entries` must hold at least one checkpoint entry. Received: []")
    if not 0 <= target < 1:
        raise ValueError(f"Argument `target` must be in [0, 1). Received: target={target}")
    if not tolerance >= 0:
        raise ValueError(f"Argument `tolerance` must be >= 0. Received: tolerance={tolerance}")

    def metric(entry: Mapping[str, Any], key: str) -> float:
        value = entry.get(key)
        if value is None or not math.isfinite(float(value)):
            return -math.inf
        return float(value)

    eligible = [e for e in entries if abs(float(e["sparsity"]) - target) <= tolerance + 1e-12]
    if eligible:
        best = max(
            eligible,
            key=lambda e: (metric(e, "val_auc"), metric(e, "val_accuracy"), int(e["epoch"])),
        )
        return {**best, "reached_target": True}
    return {**max(entries, key=lambda e: int(e["epoch"])), "reached_target": False}


def run_pruning(
    model_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
    *,
    final_sparsity: float | None = None,
    min_lr: float | None = None,
    max_lr: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> PruneResult:
    """Prune a trained model to a target sparsity while fine-tuning it under the cyclical LR.

    Loads ``model_path``, wraps it with :func:`prune_model`, and fine-tunes it for
    ``prune.epochs`` epochs with the training optimizer factory (CLR bounds as in training:
    explicit arguments, else ``schedule.min_lr``/``max_lr``), tfmot's ``UpdatePruningStep`` and
    the training loop :func:`cycleprune.training.fit`: one checkpoint per epoch whose entry holds
    the epoch's metrics and its ``sparsity``; a second call with the same ``checkpoint_dir``
    resumes. The kept checkpoint is chosen by :func:`select_checkpoint` with a target of
    ``final_sparsity`` (for ``m_by_n``: ``m / n`` over the pruned layers, see
    :func:`expected_sparsity`) and a tolerance of 0.01; it is restored, stripped and written.
    Resume, SIGTERM and per-epoch data seeds work as in training: tfmot's pruning step is a
    model variable, so it is checkpointed and continues with the optimizer's step.

    Data-parallel like training: the model is loaded, wrapped and fine-tuned inside
    ``strategy.scope()`` with global batches of ``data.batch_size * replicas`` images, and the
    pruning schedule's steps (``begin_step``, ``end_step``) come from the resulting
    ``steps_per_epoch``.

    Fine-tuning runs in float32 whatever ``train.precision`` says, inside
    :func:`cycleprune.precision.policy_scope` (so a caller's global policy does not leak in):
    tfmot's pruning wrapper does not keep float32 master weights under ``mixed_float16``
    (:data:`cycleprune.precision.PRUNING_NOTE`). When ``train.precision`` asks for mixed
    precision on this machine, that is logged and recorded in ``history.json``.

    Writes, each atomically: ``out_dir/model.keras`` (stripped, float32),
    ``out_dir/history.json`` (``epochs``: per-epoch metrics, ``sparsity``/``lr``: per step from
    the closed forms, the schedule's parameters, ``precision`` and ``precision_note``: why not
    mixed precision, or ``""``), ``out_dir/sparsity.json`` (``{target, overall, layers,
    best_checkpoint, ...}``) and ``out_dir/tensorboard/`` (epoch metrics, ``epoch_sparsity`` and
    ``layer_sparsity/<layer>``).

    Args:
        model_path: The trained model (``.keras``).
        dataset_dir: The prepared dataset.
        out_dir: Output folder.
        config: The run configuration (``prune``, ``train``, ``schedule``, ``data`` sections).
        final_sparsity: Target sparsity; default ``prune.final_sparsity``.
        min_lr, max_lr: CLR bounds; default the config's.
        checkpoint_dir: Checkpoint folder or ``gs://bucket/prefix`` (worked on in a local copy,
            published after every checkpoint: see :func:`cycleprune.mirror.mirrored_dir`);
            default ``out_dir/checkpoints``.
        strategy: Distribution strategy; default
            :func:`cycleprune.distribution.select_strategy` (all visible GPUs).

    Returns:
        A :class:`PruneResult`.

    Raises:
        ValueError: no LR bounds, a bad sparsity, or an unloadable model.
        cycleprune.training.DivergenceError: the loss or the weights became non-finite.
        cycleprune.preemption.PreemptedError: SIGTERM; a checkpoint was written, rerun to resume.
    """
    from cycleprune import mirror

    args = (model_path, dataset_dir, out_dir, config, final_sparsity, min_lr, max_lr)
    with precision.policy_scope(precision.FLOAT32):
        if checkpoint_dir is not None and storage.is_gcs(checkpoint_dir):
            with mirror.mirrored_dir(checkpoint_dir) as local:
                return _run_pruning(*args, local.path, strategy, local.sync)
        return _run_pruning(*args, checkpoint_dir, strategy, None)


def _run_pruning(
    model_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
    final_sparsity: float | None,
    min_lr: float | None,
    max_lr: float | None,
    checkpoint_dir: str | os.PathLike | None,
    strategy: tf.distribute.Strategy | None,
    on_checkpoint: Callable[[], None] | None,
) -> PruneResult:
    import tensorflow_model_optimization as tfmot

    from cycleprune import data, distribution, losses, models, schedules, training

    low, high = training.resolve_lr_bounds(config.schedule, min_lr, max_lr)
    prune = config.prune
    low, high = low * prune.lr_scale, high * prune.lr_scale
    target = _target(prune, final_sparsity)
    if config.train.deterministic:
        training.enable_determinism(config.train.seed)
    strategy = strategy if strategy is not None else distribution.select_strategy()
    global_batch = distribution.global_batch_size(config.data.batch_size, strategy)
    out_dir = Path(out_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir / "checkpoints"
    info = data.load_info(str(dataset_dir), verify=True)
    train_batches = training.epoch_batches(
        dataset_dir,
        config.data,
        batch_size=global_batch,
        class_weight=data.class_weights(info, config.data),
    )
    val_config = dataclasses.replace(config.data, batch_size=global_batch)
    val_ds = data.make_dataset(str(dataset_dir), "val", val_config, training=False)
    steps = training.steps_per_epoch(train_batches(0), info.num_examples("train"), global_batch)
    note = ""
    if precision.resolve_precision(config.train.precision) == precision.MIXED:
        note = precision.PRUNING_NOTE
        log = logger.info if config.train.precision == precision.AUTO else logger.warning
        log("train.precision=%s: %s.", config.train.precision, note)

    with strategy.scope():
        dense = models.load_model(model_path)
        model_sha256 = _model_sha256(dense)
        pruned = prune_model(dense, prune, steps_per_epoch=steps, final_sparsity=target)
        optimizer = schedules.make_optimizer(
            config.train, config.schedule, min_lr=low, max_lr=high, steps_per_epoch=steps
        )
        metrics = training.default_metrics(info.num_classes, config.evaluate.positive_class)
    goal = expected_sparsity(pruned, target, prune.m_by_n)
    problems = _schedule_problems(prune, steps, target)
    for problem in problems:
        logger.warning(problem)

    def metadata(model: keras.Model) -> dict:
        return {"sparsity": overall_sparsity(model), "layer_sparsity": sparsity_report(model)}

    tensorboard_src = checkpoint_dir / training.TENSORBOARD_DIR
    result = training.fit(
        pruned,
        train_batches,
        val_ds,
        optimizer=optimizer,
        loss=losses.make_loss(config.train),
        epochs=prune.epochs,
        steps_per_epoch=steps,
        checkpoint_dir=checkpoint_dir,
        tensorboard_dir=tensorboard_src,
        metrics=metrics,
        extra_callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        epoch_metadata=metadata,
        max_to_keep=None,  # every epoch is a candidate for select_checkpoint
        on_checkpoint=on_checkpoint,
        # tfmot's wrappers count their pruning step in the graph (UpdatePruningStep has no
        # per-batch hook), so the sparsity schedule is per step however many run per call.
        steps_per_execution=config.train.steps_per_execution,
        # The sparsity schedule lives in the wrappers, not the optimizer: a resume must share it
        # (more fine-tuning epochs may be added, as in training). So must the model being pruned
        # (its checkpoints would replace another model's weights) and the input's settings
        # (augmentation, class weights), as in training.
        resume_key={
            "model_sha256": model_sha256,
            "dataset": info.version,
            "data": dataclasses.asdict(config.data),
            "final_sparsity": target,
            "prune": {
                k: v
                for k, v in dataclasses.asdict(prune).items()
                if k not in ("sparsities", "epochs")
            },
        },
    )
    best = select_checkpoint(result.checkpoints, goal, DEFAULT_TOLERANCE)
    if not best["reached_target"]:
        problems.append(
            f"No checkpoint reached the target sparsity {goal:.4f} within {DEFAULT_TOLERANCE}; "
            f"kept the last one (epoch {best['epoch']}, sparsity {best['sparsity']:.4f})."
        )
        logger.warning(problems[-1])
    with strategy.scope():
        restored = tf.train.Checkpoint(model=pruned).restore(best["checkpoint"])
        restored.assert_existing_objects_matched().expect_partial()
        stripped = strip(pruned)
    # The path is local; for gs:// it is in a mirror's working copy that is gone after the stage.
    best = {**best, "checkpoint": Path(best["checkpoint"]).name}
    layers = sparsity_report(stripped)
    overall = overall_sparsity(stripped)

    step_size = schedules.clr_step_size(steps, config.schedule.step_size_epochs)
    step_index = np.arange(result.global_step)
    if prune.m_by_n:
        per_step = np.full(result.global_step, goal)
    else:
        per_step = scheduled_sparsity(
            result.global_step, prune, steps_per_epoch=steps, final_sparsity=target
        )
    lrs = schedules.clr(
        step_index, low, high, step_size, policy=config.schedule.policy, gamma=config.schedule.gamma
    )
    history = {
        "epochs": result.epochs,
        "steps": step_index.tolist(),
        "sparsity": per_step.tolist(),
        "lr": lrs.tolist(),
        "target_sparsity": goal,
        "schedule": prune.schedule,
        "initial_sparsity": prune.initial_sparsity,
        "final_sparsity": target,
        "begin_step": prune.begin_epoch * steps,
        "end_step": prune.end_epoch * steps,
        "frequency": prune.frequency,
        "m_by_n": prune.m_by_n,
        "min_lr": low,
        "max_lr": high,
        "step_size": step_size,
        "policy": config.schedule.policy,
        "gamma": config.schedule.gamma,
        "num_epochs": prune.epochs,
        "steps_per_epoch": steps,
        "global_step": result.global_step,
        "replicas": distribution.replicas(strategy),
        "global_batch_size": global_batch,
        "precision": precision.FLOAT32,
        "precision_note": note,
    }
    report = {
        "target": goal,
        "final_sparsity": target,
        "m_by_n": prune.m_by_n,
        "overall": overall,
        "layers": layers,
        "pruned_layers": sorted(w.layer.name for w in _wrappers(pruned)),
        "best_checkpoint": best,
        "tolerance": DEFAULT_TOLERANCE,
        "warnings": problems,
    }
    model_path_out = training.write_outputs(stripped, out_dir, history, tensorboard_src)
    storage.atomic_write_json(out_dir / "sparsity.json", report)
    return PruneResult(
        model_path=str(model_path_out),
        history=history,
        sparsity=overall,
        layer_sparsity=layers,
        best_checkpoint=best,
        warnings=problems,
    )


def _model_sha256(model: keras.Model) -> str:
    """sha256 of a model's architecture and weights.

    Not of its file: Keras writes the save time into a ``.keras`` file, so a training stage that
    ran again (a retry, a resume of a finished run) saves the same model with other bytes.
    """
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _schedule_problems(config: PruneConfig, steps_per_epoch: int, target: float) -> list[str]:
    """Warnings for a schedule that cannot reach its target within the fine-tuning epochs."""
    if config.m_by_n:
        return []
    total = config.epochs * steps_per_epoch
    reached = scheduled_sparsity(
        total, config, steps_per_epoch=steps_per_epoch, final_sparsity=target
    )
    last = float(reached[-1]) if total else 0.0
    if last < target - DEFAULT_TOLERANCE:
        return [
            f"The pruning schedule only reaches sparsity {last:.4f} of {target:.4f} in "
            f"{config.epochs} epochs of {steps_per_epoch} steps (prune.frequency="
            f"{config.frequency} steps does not divide the ramp of "
            f"{(config.end_epoch - config.begin_epoch) * steps_per_epoch} steps)."
        ]
    return []


def _is_wrapper(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    return isinstance(layer, pruning_wrapper.PruneLowMagnitude)


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(_all_layers(layer))
        else:
            layers.append(layer)
    return layers


def _wrappers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in _all_layers(model) if _is_wrapper(layer)]


def _kernels(model: keras.Model) -> list[tuple[str, np.ndarray]]:
    """(name, effective kernel) of every Conv2D/Dense layer; masks applied for wrapped ones."""
    kernels = []
    for layer in _all_layers(model):
        if _is_wrapper(layer):
            inner = layer.layer
            if isinstance(inner, PRUNABLE_LAYERS):
                masks = {id(weight): mask for weight, mask, _ in layer.pruning_vars}
                mask = masks.get(id(inner.kernel))
                kernel = inner.kernel.numpy()
                if mask is not None:
                    kernel = kernel * mask.numpy()
                kernels.append((inner.name, kernel))
        elif isinstance(layer, PRUNABLE_LAYERS):
            kernels.append((layer.name, layer.kernel.numpy()))
    return kernels
