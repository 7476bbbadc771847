"""The LR range test (Smith 2017, section 3.3): a recorder plus a pure suggestion rule.

:func:`find_lr` trains a model for ``num_steps`` optimizer steps while the learning rate grows
exponentially from ``start_lr`` to ``end_lr`` (an in-graph :class:`ExponentialSweep` schedule),
records the loss of every step, stops once the loss diverges, and restores the model's weights
bit for bit. :func:`smooth_losses` and :func:`suggest_bounds` are pure functions of the record;
:func:`run_lr_finder` is the pipeline stage around them.

Reference: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
https://arxiv.org/abs/1506.01186 ("LR range test"); the exponential sweep, the bias-corrected
smoothing and the divergence stop follow fastai's ``LRFinder`` (S. Gugger, "How Do You Find A
Good Learning Rate", 2017).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune.compat import keras, tf
from cycleprune.config import Config, LRFinderConfig

logger = logging.getLogger(__name__)

# The divergence test starts after at least this many steps (see find_lr).
MIN_STEPS_BEFORE_STOP = 3
# suggest_bounds: the least relative fall of the smoothed loss that counts as a descent, and the
# fewest points needed from the plateau down to the floor.
MIN_RELATIVE_DROP = 0.05
MIN_POINTS = 5
# steepest_valley: the valley starts where the curve is 20% of its depth below the plateau;
# max_lr sits a factor 3 (half a decade) below the floor; the range spans at least a factor 4.
VALLEY_START = 0.20
MAX_LR_MARGIN = 3.0
MIN_RANGE_RATIO = 4.0
# Resumable sweeps (find_lr's checkpoint_dir): checkpoint name, record file, and the interval in
# steps when the dataset's length is unknown.
SWEEP_NAME = "sweep"
SWEEP_STATE = "sweep.json"
DEFAULT_CHECKPOINT_EVERY = 10
# The optimizers the sweep can train with (every `train.optimizer`; a test keeps them in step).
SWEEP_OPTIMIZERS = ("sgd", "adam")

_RESULT_FILE = "lr_finder.json"


class LRFinderError(ValueError):
    """The LR range test produced no usable curve (no descent, too few points, no data).

    When raised by :func:`find_lr` after a sweep, ``record`` holds the ``lrs``, ``losses`` and
    ``smoothed`` arrays that were recorded and ``stopped`` (the sweep ended early, diverged);
    otherwise it is ``None``.
    """

    record: dict[str, Any] | None = None


@dataclasses.dataclass
class LRFinderResult:
    """The record of an LR range test and the suggested CLR bounds.

    Attributes:
        lrs: Learning rate of each recorded step.
        losses: Raw training loss of each recorded step (all finite).
        smoothed: :func:`smooth_losses` of ``losses``.
        min_lr, max_lr: Suggested CLR bounds (:func:`suggest_bounds`).
        stopped_early: The sweep stopped before ``num_steps`` (divergence or a non-finite loss).
        steps: Number of recorded steps (``len(lrs)``).
        rule: Name of the suggestion rule.
        bounds_from: ``"lr_finder"`` when ``min_lr``/``max_lr`` are the suggestion, ``"config"``
            when the configuration fixed them (``schedule.min_lr``/``max_lr``); the suggestion is
            then kept in ``suggested_min_lr``/``suggested_max_lr`` (``None`` if the curve had
            no usable descent, with the reason in ``note``).
        precision: ``float32`` or ``mixed_float16``: what the sweep computed in.
        optimizer: ``sgd`` or ``adam``: the optimizer the sweep trained with (the training's:
            on ``small``, Adam's suggested ``min_lr`` lies 4-12x below SGD's).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    min_lr: float
    max_lr: float
    stopped_early: bool
    steps: int
    rule: str = "steepest_valley"
    bounds_from: str = "lr_finder"
    suggested_min_lr: float | None = None
    suggested_max_lr: float | None = None
    note: str = ""
    precision: str = "float32"
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if self.bounds_from == "lr_finder" and self.suggested_min_lr is None:
            self.suggested_min_lr, self.suggested_max_lr = self.min_lr, self.max_lr

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays as lists of floats)."""
        return {
            "lrs": [float(v) for v in self.lrs],
            "losses": [float(v) for v in self.losses],
            "smoothed": [float(v) for v in self.smoothed],
            "min_lr": float(self.min_lr),
            "max_lr": float(self.max_lr),
            "stopped_early": bool(self.stopped_early),
            "steps": int(self.steps),
            "rule": self.rule,
            "bounds_from": self.bounds_from,
            "suggested_min_lr": _float_or_none(self.suggested_min_lr),
            "suggested_max_lr": _float_or_none(self.suggested_max_lr),
            "note": self.note,
            "precision": self.precision,
            "optimizer": self.optimizer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRFinderResult:
        return cls(
            lrs=np.asarray(data["lrs"], np.float64),
            losses=np.asarray(data["losses"], np.float64),
            smoothed=np.asarray(data["smoothed"], np.float64),
            min_lr=float(data["min_lr"]),
            max_lr=float(data["max_lr"]),
            stopped_early=bool(data["stopped_early"]),
            steps=int(data["steps"]),
            rule=str(data.get("rule", "steepest_valley")),
            bounds_from=str(data.get("bounds_from", "lr_finder")),
            suggested_min_lr=_float_or_none(data.get("suggested_min_lr")),
            suggested_max_lr=_float_or_none(data.get("suggested_max_lr")),
            note=str(data.get("note", "")),
            precision=str(data.get("precision", "float32")),
            optimizer=str(data.get("optimizer", "sgd")),  # records before it was kept: SGD
        )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def sweep_lrs(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """The exponential sweep ``lr_i = start_lr * (end_lr / start_lr)**(i / (num_steps - 1))``.

    Raises:
        ValueError: ``start_lr`` <= 0, ``end_lr`` <= ``start_lr`` or ``num_steps`` < 2.
    """
    _check_sweep(start_lr, end_lr, num_steps)
    i = np.arange(num_steps, dtype=np.float64)
    return start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))


def _check_sweep(start_lr: float, end_lr: float, num_steps: int) -> None:
    if not start_lr > 0:
        raise ValueError(f"Argument `start_lr` must be > 0. Received: start_lr={start_lr}")
    if not end_lr > start_lr:
        raise ValueError(
            f"Argument `end_lr` must be > start_lr. Received: start_lr={start_lr}, end_lr={end_lr}"
        )
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"Argument `num_steps` must be an int >= 2. Received: {num_steps=}")


@keras.utils.register_keras_serializable(package="cycleprune")
class ExponentialSweep(keras.optimizers.schedules.LearningRateSchedule):
    """The LR range test's schedule, in the graph: ``start * (end / start)**(step / (n - 1))``.

    Args:
        start_lr: Learning rate at step 0, > 0.
        end_lr: Learning rate at step ``num_steps - 1``, > ``start_lr``.
        num_steps: Steps of the sweep, >= 2.

    Raises:
        ValueError: an invalid argument.
    """

    def __init__(self, start_lr: float, end_lr: float, num_steps: int, name: str = "Sweep"):
        super().__init__()
        _check_sweep(start_lr, end_lr, num_steps)
        self.start_lr = float(start_lr)
        self.end_lr = float(end_lr)
        self.num_steps = int(num_steps)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            fraction = tf.cast(step, tf.float64) / (self.num_steps - 1)
            lr = self.start_lr * tf.exp(math.log(self.end_lr / self.start_lr) * fraction)
            return tf.cast(lr, tf.float32)

    def get_config(self) -> dict:
        return {
            "start_lr": self.start_lr,
            "end_lr": self.end_lr,
            "num_steps": self.num_steps,
            "name": self.name,
        }


def smooth_losses(losses, beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average of a loss record.

    ``avg_i = beta * avg_{i-1} + (1 - beta) * loss_i`` with ``avg_{-1} = 0``, and
    ``smoothed_i = avg_i / (1 - beta**(i + 1))`` (the Adam-style bias correction, so that the
    first values are not pulled towards 0).

    Args:
        losses: 1-D sequence of losses.
        beta: Smoothing factor in [0, 1); 0 returns the losses unchanged.

    Returns:
        float64 array of the same length.

    Raises:
        ValueError: ``beta`` out of range, or ``losses`` not 1-D.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"Argument `beta` must be in [0, 1). Received: beta={beta}")
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"Argument `losses` must be 1-D. Received: shape={values.shape}")
    out = np.empty_like(values)
    avg = 0.0
    for i, value in enumerate(values):
        avg = beta * avg + (1.0 - beta) * value
        out[i] = avg / (1.0 - beta ** (i + 1))
    return out


def suggest_bounds(lrs, smoothed, *, skip_start: int | None = None) -> tuple[float, float]:
    """Suggest CLR bounds from an LR range test: the ``steepest_valley`` rule.

    Smith (2017, section 3.3) sets the lower bound where the loss starts to fall and the upper
    bound where it stops falling. On a smoothed curve (an EMA, which lags the raw loss) this rule
    reads those points as follows:

    1. Skip the first ``skip_start`` points: a bias-corrected moving average there is the mean
       of only a few losses, as noisy as single batches.
    2. The *floor* ``i_min`` is the lowest smoothed loss. An EMA keeps falling while the raw
       loss stays low and turns up only once the raw loss rises, so the floor marks the onset of
       divergence; everything after it is cut off.
    3. ``max_lr = lr[i_min] / 3``: half a decade below the divergence onset, for the loss is
       already unstable near the floor. Measured on the bundled data (``small`` preset before it
       gained contrast augmentation, 4 seeds, each sweeping and then training 4 epochs of CLR
       with its own suggestion): a margin of 3 matched the article's hand-picked bounds
       (validation accuracy 0.933 vs 0.933, AUC 0.992 vs 0.993); fastai's margin of 10 lost
       0.7 points of AUC (0.986), and no margin (the floor itself) cost 15 points of accuracy.
       With the full ``small`` runs (8 epochs) it lifted the dense model's test accuracy and
       AUC (``benchmarks/results/ablation.md``, L0 against M). Over 8 seeds of that short run
       (R), accuracy at the 0.5 cut-off swings by up to 44 points between nearly equal bounds
       (one seed's floor at 0.9 gave ``max_lr`` 0.3 and accuracy 0.64 at an AUC of 0.992); the
       cautious Smith floor (a zero-lag smoothed minimum, ``max_lr`` 0.014-0.10) scored best
       there, but in full 24-epoch ``small`` runs it lowered the dense model's test AUC in each
       of 3 seeds (0.980 -> 0.974; the ablation's W), as the margin of 10 had lost before.
    4. The *valley* is the final descent into the floor: from the highest point ``i_top`` before
       the floor, of depth ``D = s[i_top] - s[i_min]``. It starts where the curve last stands
       at ``s[i_top] - 0.2 D`` before the floor: a fifth of the way down, beyond the noise of
       the plateau (and searching backwards from the floor, so that a dip on the plateau does
       not start it early). ``min_lr`` is the LR there, interpolated in log(LR): where the loss
       has clearly started to fall steeply.
    5. A usable CLR range spans at least a factor 4 (Smith 2017: a base LR of 1/3-1/4 of the
       maximum works), so ``min_lr = min(min_lr, max_lr / 4)``; hence ``min_lr < max_lr``.

    On the bundled PneumoniaMNIST with the ``small`` preset (width 0.25, BatchNorm, batch 64,
    cross-entropy with label smoothing 0.1, contrast augmentation, 64 steps from 1e-5 to 10,
    less than one epoch) it suggested 1.3e-4..0.30, 5.6e-4..0.10 and 1.0e-3..0.12 (twice) over
    seeds 1-4, around the article's hand-picked 1e-3..1e-1. On the ``best`` preset's ResNet-18 it
    suggests min_lr 4.4e-4-7.0e-4 and max_lr 0.021-0.033 (seeds 1-3); fixed bounds of 1e-3..1e-1 and
    1e-4..1e-2 did not rank the test images better (dense test AUC 0.983 and 0.977 against
    0.984 over 3 seeds; ``benchmarks/results/ablation.md``, the fifteenth round).

    Args:
        lrs: Increasing learning rates of the sweep (> 0).
        smoothed: Smoothed loss at each LR (see :func:`smooth_losses`), same length.
        skip_start: Points to ignore at the start; default ``min(10, len(lrs) // 10)``
            (fastai v1 skips 10 points of its 100-step sweep).

    Returns:
        ``(min_lr, max_lr)`` with ``min_lr < max_lr``.

    Raises:
        ValueError: mismatched, non-1-D, non-finite or non-increasing inputs, a bad
            ``skip_start``.
        LRFinderError: no usable descent: the smoothed loss falls by less than 5% of its
            plateau level, or over fewer than 5 points.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    smoothed = np.asarray(smoothed, dtype=np.float64)
    if lrs.ndim != 1 or smoothed.shape != lrs.shape:
        raise ValueError(
            "Arguments `lrs` and `smoothed` must be 1-D and of the same length. Received: "
            f"shapes {lrs.shape} and {smoothed.shape}"
        )
    if not (np.all(np.isfinite(lrs)) and np.all(np.isfinite(smoothed))):
        raise ValueError("Arguments `lrs` and `smoothed` must be finite.")
    if lrs.size and (lrs[0] <= 0 or np.any(np.diff(lrs) <= 0)):
        raise ValueError("Argument `lrs` must be positive and strictly increasing.")
    if skip_start is None:
        skip_start = default_skip_start(lrs.size)
    if isinstance(skip_start, bool) or int(skip_start) != skip_start or skip_start < 0:
        raise ValueError(f"Argument `skip_start` must be an int >= 0. Received: {skip_start=}")
    skip = int(skip_start)
    if lrs.size - skip < MIN_POINTS:
        raise LRFinderError(
            f"no usable descent: {lrs.size} recorded steps ({skip} skipped at the start) leave "
            f"fewer than {MIN_POINTS} points. Raise lr_finder.num_steps or lower "
            "lr_finder.start_lr."
        )
    lrs, curve = lrs[skip:], smoothed[skip:]
    i_min = int(np.argmin(curve))
    i_top = int(np.argmax(curve[: i_min + 1]))
    top, floor = curve[i_top], curve[i_min]
    depth = top - floor
    where = f"lr {lrs[i_top]:.3g} -> {lrs[i_min]:.3g}"
    if depth < MIN_RELATIVE_DROP * abs(top):
        raise LRFinderError(
            f"no usable descent: the smoothed loss falls from {top:.4g} to at best {floor:.4g} "
            f"({where}, {depth / abs(top) if top else 0.0:.1%}), less than "
            f"{MIN_RELATIVE_DROP:.0%}. Widen the sweep (lr_finder.end_lr) or check the data."
        )
    if i_min - i_top + 1 < MIN_POINTS:
        raise LRFinderError(
            f"no usable descent: the smoothed loss falls over {i_min - i_top + 1} points only "
            f"({where}); at least {MIN_POINTS} are needed. Lower lr_finder.start_lr or raise "
            "lr_finder.num_steps."
        )
    max_lr = float(lrs[i_min]) / MAX_LR_MARGIN
    level = top - VALLEY_START * depth
    # The last point at or above the level before the floor; the next one is below it.
    j = i_top + int(np.flatnonzero(curve[i_top:i_min] >= level)[-1])
    fraction = (curve[j] - level) / (curve[j] - curve[j + 1])
    log_start = np.log(lrs[j]) + fraction * (np.log(lrs[j + 1]) - np.log(lrs[j]))
    min_lr = min(float(np.exp(log_start)), max_lr / MIN_RANGE_RATIO)
    return min_lr, max_lr


def default_skip_start(num_points: int) -> int:
    """Noisy warm-up points of a smoothed record: ``min(10, num_points // 10)``."""
    return min(10, num_points // 10)


def find_lr(
    model: keras.Model,
    dataset,
    config: LRFinderConfig,
    *,
    loss: keras.losses.Loss,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    handle_sigterm: bool = True,
    on_checkpoint: Any = None,
) -> LRFinderResult:
    """Run the LR range test on ``model`` and suggest CLR bounds.

    A fresh optimizer of the kind the training will use (``SGD(momentum)`` or ``Adam``, Keras'
    defaults otherwise) follows an :class:`ExponentialSweep` from
    ``config.start_lr`` to ``config.end_lr`` over exactly ``config.num_steps`` steps of the
    repeated ``dataset`` (so the cost does not depend on the dataset size or on epochs). The loss
    of every step is recorded and smoothed (:func:`smooth_losses` with ``config.beta``); the sweep
    stops early when the loss is not finite or when the smoothed loss exceeds
    ``config.stop_factor`` times the best one so far (both counted after the first
    ``max(3, default_skip_start(num_steps))`` steps, whose smoothed values are still noisy).
    Afterwards the model's weights (including BatchNorm statistics) are restored bit for bit; the
    model's own compiled optimizer, if any, is never touched.

    The model's distribution strategy (the one in scope when it was built) runs each step: the
    batches are global batches, split across the replicas, and the recorded loss is the mean
    over the whole global batch, as on one device.

    With ``checkpoint_dir``, the sweep is resumable: every ``checkpoint_every`` steps (default:
    one pass over ``dataset``, its cardinality, else 10) the model, the optimizer and the record
    so far are saved (``sweep-<step>`` and then ``sweep.json``, which names it); on SIGTERM the
    current step is saved and :class:`~cycleprune.preemption.PreemptedError` raised. A call with
    the same ``checkpoint_dir`` and sweep settings continues from the saved step on the same
    batches (the repeated ``dataset`` is skipped forward) and returns the same record as an
    uninterrupted sweep; once a sweep has finished, ``sweep.json`` holds its whole record and a
    further call returns it without training.

    Args:
        model: A built Keras model (it is trained during the test, then restored).
        dataset: ``tf.data`` batches of ``(x, y)`` or ``(x, y, sample_weight)``.
        config: Sweep endpoints, steps, smoothing, stop factor.
        loss: The training loss (its per-example values are averaged over each global batch).
        optimizer: ``sgd`` or ``adam``, as ``train.optimizer``: the two descend at different
            learning rates, so bounds found with one do not suit the other.
        momentum: SGD momentum during the sweep (unused with Adam).
        checkpoint_dir: Folder for the sweep's checkpoints, or ``None`` for none.
        checkpoint_every: Steps between checkpoints (>= 1).
        on_checkpoint: Called with no arguments after every write to ``checkpoint_dir`` (e.g.
            to publish it: see :func:`cycleprune.mirror.mirrored_dir`).
        handle_sigterm: Install the SIGTERM handler while sweeping.

    Returns:
        An :class:`LRFinderResult` with the record and the suggested ``(min_lr, max_lr)``.

    Raises:
        LRFinderError: the dataset is empty, or the curve has no usable descent
            (see :func:`suggest_bounds`).
        ValueError: an unknown ``optimizer``, an invalid ``momentum`` or ``checkpoint_every``.
        cycleprune.preemption.PreemptedError: SIGTERM; a checkpoint was written.
    """
    from cycleprune import preemption

    if optimizer not in SWEEP_OPTIMIZERS:
        raise ValueError(
            f"Argument `optimizer` must be one of {', '.join(SWEEP_OPTIMIZERS)}. "
            f"Received: optimizer={optimizer!r}"
        )
    if not 0 <= momentum < 1:
        raise ValueError(f"Argument `momentum` must be in [0, 1). Received: momentum={momentum}")
    if checkpoint_every is None:
        cardinality = int(dataset.cardinality())
        checkpoint_every = cardinality if cardinality > 0 else DEFAULT_CHECKPOINT_EVERY
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise ValueError(
            f"Argument `checkpoint_every` must be an int. Received: {checkpoint_every=}"
        )
    if checkpoint_every < 1:
        raise ValueError(f"Argument `checkpoint_every` must be >= 1. Received: {checkpoint_every=}")
    num_steps = config.num_steps
    lr_values = sweep_lrs(config.start_lr, config.end_lr, num_steps)
    strategy = model.distribute_strategy
    kind = optimizer  # the name: `optimizer` is the Keras optimizer from here on
    with strategy.scope():
        sweep_lr = ExponentialSweep(config.start_lr, config.end_lr, num_steps)
        if kind == "sgd":
            optimizer = keras.optimizers.SGD(learning_rate=sweep_lr, momentum=momentum)
        elif kind == "adam":
            optimizer = keras.optimizers.Adam(learning_rate=sweep_lr)
        else:  # in SWEEP_OPTIMIZERS but not built here
            raise NotImplementedError(f"The LR range test cannot sweep with {kind!r} yet.")
        mixed = keras.mixed_precision.global_policy().compute_dtype == "float16"
        if mixed:
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        variables = model.trainable_variables
        optimizer.build(variables)  # slots exist before a restore fills them

    def replica_step(batch):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        context = tf.distribute.get_replica_context()
        # The global batch's size, so that a short last batch (split unevenly) is averaged
        # exactly as one device would.
        count = context.all_reduce("sum", tf.cast(tf.shape(x)[0], tf.float32))
        with tf.GradientTape() as tape:
            predictions = model(x, training=True)
            per_example = tf.cast(loss.call(y, predictions), tf.float32)
            if sample_weight is not None:
                per_example *= tf.cast(sample_weight, tf.float32)
            value = tf.reduce_sum(per_example) / count
            if model.losses:
                value += tf.add_n(model.losses) / strategy.num_replicas_in_sync
            scaled = optimizer.get_scaled_loss(value) if mixed else value
        grads = tape.gradient(scaled, variables)
        if mixed:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return value

    @tf.function(reduce_retracing=True)  # the last batch of an epoch may be smaller
    def train_step(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        return strategy.reduce("sum", per_replica, axis=None)

    # The first smoothed values average only a few losses: a lucky batch there would make
    # "best" too low and stop the sweep at once. Track the best (and test) only after them.
    warmup = max(MIN_STEPS_BEFORE_STOP, default_skip_start(num_steps))
    saved = [np.array(w, copy=True) for w in model.get_weights()]
    sweep = (
        _SweepCheckpoint(
            model,
            optimizer,
            checkpoint_dir,
            config,
            on_checkpoint,
            initial_weights=saved,
            also={
                "optimizer": kind,
                "momentum": momentum,
                "loss": _loss_key(loss),
                "model": [[w.name, list(w.shape)] for w in model.weights],
            },
        )
        if checkpoint_dir
        else None
    )
    recorded: list[float] = []
    stopped = done = False
    guard = preemption.SigtermGuard() if handle_sigterm else contextlib.nullcontext(None)
    try:
        if sweep is not None:
            recorded, stopped, done = sweep.resume()
        watch = _DivergenceWatch(config.beta, config.stop_factor, warmup)
        for value in recorded:
            watch.add(value)
        with guard as sigterm:
            start = len(recorded)
            batches = strategy.experimental_distribute_dataset(
                dataset.repeat().skip(start).take(num_steps - start)
            )
            for i, batch in enumerate(batches if not done else (), start=start):
                if sigterm is not None and sigterm.requested:
                    path = sweep.save(recorded) if sweep is not None and _finite(model) else None
                    raise preemption.PreemptedError(i, path)
                value = float(train_step(batch))
                if not math.isfinite(value):
                    stopped = True
                    break
                recorded.append(value)
                if watch.add(value):
                    stopped = True
                    break
                step = i + 1
                due = sweep is not None and step % checkpoint_every == 0 and step < num_steps
                if due and _finite(model):  # non-finite weights stop the sweep at the next step
                    sweep.save(recorded)
            if sweep is not None and not done:
                sweep.finish(recorded, stopped)
    finally:
        model.set_weights(saved)
    if not recorded:
        raise LRFinderError("no usable descent: the dataset yielded no batches (or only NaN loss)")
    losses = np.asarray(recorded, dtype=np.float64)
    lrs = lr_values[: losses.size]
    smoothed = smooth_losses(losses, config.beta)
    try:
        rule = SUGGESTION_RULES[config.rule]
        min_lr, max_lr = rule(lrs, smoothed, skip_start=default_skip_start(num_steps))
    except LRFinderError as err:
        # Keep the record for diagnosis (plot it with cycleprune.plots.plot_lr_finder).
        err.record = {"lrs": lrs, "losses": losses, "smoothed": smoothed, "stopped": stopped}
        raise
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        min_lr=min_lr,
        max_lr=max_lr,
        stopped_early=stopped,
        steps=int(losses.size),
        rule=config.rule,
        optimizer=kind,
    )


class _DivergenceWatch:
    """The sweep's stop rule, fed one raw loss at a time: True once the smoothed loss exceeds
    ``stop_factor`` times the best smoothed loss seen after ``warmup`` steps."""

    def __init__(self, beta: float, stop_factor: float, warmup: int) -> None:
        self.beta, self.stop_factor, self.warmup = beta, stop_factor, warmup
        self.avg, self.best, self.count = 0.0, math.inf, 0

    def add(self, value: float) -> bool:
        self.avg = self.beta * self.avg + (1.0 - self.beta) * value
        self.count += 1
        current = self.avg / (1.0 - self.beta**self.count)
        if self.count <= self.warmup:
            return False
        self.best = min(self.best, current)
        return current > self.stop_factor * self.best


def _loss_key(loss: Any) -> Any:
    """The loss's class and configuration, for the sweep record's settings."""
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    return {"class": type(loss).__name__, **{k: v for k, v in config.items() if k != "name"}}


def _finite(model: keras.Model) -> bool:
    return all(np.isfinite(w).all() for w in model.get_weights())


class _SweepCheckpoint:
    """``sweep-<step>`` (model + optimizer) and ``sweep.json`` (the record; written last)."""

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any,
        folder: str | os.PathLike,
        config: LRFinderConfig,
        on_checkpoint: Any = None,
        initial_weights: list[np.ndarray] | None = None,
        also: dict[str, Any] | None = None,
    ) -> None:
        from cycleprune import storage

        self.on_checkpoint = on_checkpoint
        self.folder = Path(folder)
        self.state_path = self.folder / SWEEP_STATE
        # What the record depends on beyond the sweep's own settings: a record of another
        # model, loss or momentum is another curve.
        self.settings = storage.to_json_value({**dataclasses.asdict(config), **(also or {})})
        self.model, self.optimizer = model, optimizer
        # For a restart after a failed restore: the model's weights (find_lr's own copy) and the
        # freshly built optimizer's variables.
        self.initial_weights = initial_weights or [w.copy() for w in model.get_weights()]
        self.initial_slots = [np.array(v.numpy(), copy=True) for v in optimizer.variables]
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.folder), max_to_keep=1, checkpoint_name=SWEEP_NAME
        )

    def resume(self) -> tuple[list[float], bool, bool]:
        """``(recorded losses, stopped early, finished)``; restores the model mid-sweep."""
        from cycleprune import storage

        if not self.state_path.is_file():
            return [], False, False
        try:
            state = storage.read_json(self.state_path)
            settings, done = state["settings"], bool(state["done"])
            recorded = [float(v) for v in state["losses"]]
            stopped, name = bool(state.get("stopped")), state.get("checkpoint")
        except (ValueError, KeyError, TypeError) as err:
            logger.warning("Ignoring the unreadable LR sweep record %s: %r", self.state_path, err)
            return [], False, False
        if settings != self.settings:
            logger.warning(
                "Ignoring the LR sweep checkpoint in %s: it was made with other settings (%s).",
                self.folder,
                settings,
            )
            return [], False, False
        if done:
            logger.info("The LR sweep in %s is finished: reusing its record.", self.folder)
            return recorded, stopped, True
        path = str(self.folder / str(name))
        try:
            status = self.checkpoint.restore(path)
            status.assert_existing_objects_matched().expect_partial()
        except (tf.errors.OpError, ValueError, AssertionError) as err:
            # A retry must not fail the same way forever: sweep again from the start, from the
            # initial weights (a failed read may have overwritten some of them).
            logger.warning("Ignoring the unreadable LR sweep checkpoint %s: %s", path, err)
            self.model.set_weights(self.initial_weights)
            for variable, value in zip(self.optimizer.variables, self.initial_slots, strict=True):
                variable.assign(value)
            return [], False, False
        logger.info("Resuming the LR sweep from %s at step %d", path, len(recorded))
        return recorded, False, False

    def save(self, recorded: list[float]) -> str:
        from cycleprune import storage

        path = self.manager.save(checkpoint_number=len(recorded))
        state = {
            "settings": self.settings,
            "losses": recorded,
            "stopped": False,
            "done": False,
            "checkpoint": Path(path).name,
        }
        storage.atomic_write_json(self.state_path, state)
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        return path

    def finish(self, recorded: list[float], stopped: bool) -> None:
        from cycleprune import storage

        state = {"settings": self.settings, "losses": recorded, "stopped": stopped, "done": True}
        storage.atomic_write_json(self.state_path, state)
        if self.on_checkpoint is not None:
            self.on_checkpoint()


# config.LRFinderConfig.rule -> suggestion function (lrs, smoothed, *, skip_start) -> bounds.
SUGGESTION_RULES = {"steepest_valley": suggest_bounds}


def sweep_momentum(config: Config) -> float:
    """The SGD momentum the range test sweeps with: the one training uses at its peak LR.

    ``train.momentum``; under cyclical momentum (``schedule.cyclical_momentum``, where
    ``train.momentum`` is unused) ``schedule.min_momentum``, training's momentum at ``max_lr``,
    the bound the sweep's divergence decides: the effective step grows as lr / (1 - momentum).
    """
    if config.schedule.cyclical_momentum:
        return config.schedule.min_momentum
    return config.train.momentum


def run_lr_finder(
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: Config,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> LRFinderResult:
    """The LR-finder stage: the range test on the training split, with its outputs.

    When the configuration fixes the CLR bounds (``schedule.min_lr``/``max_lr``), those are the
    result's bounds (``bounds_from="config"``) and a curve without usable descent is recorded
    rather than raised; otherwise the suggestion is.

    Builds the model (``config.model``, seeded with ``config.train.seed``) for the dataset's
    image shape and classes, the loss (``config.train``) and the class weights
    (``config.data.class_weight``), runs :func:`find_lr` on the shuffled, augmented training
    split in global batches of ``config.data.batch_size * replicas`` (the batch training will
    use, so the suggested bounds suit it) with the training's optimizer (``config.train.optimizer``
    and the momentum of :func:`sweep_momentum`), and writes,
    atomically, ``out_dir/lr_finder.json`` (:meth:`LRFinderResult.to_dict`) and
    ``out_dir/lr_finder.png``.

    The model is built, and swept, in the precision training will use: ``train.precision``
    resolved by :func:`cycleprune.precision.stage_precision` (with the sweep's checkpoints),
    inside :func:`cycleprune.precision.policy_scope`; the result records it as ``precision``.

    Args:
        dataset_dir: A prepared dataset (:func:`cycleprune.data.prepare_dataset`).
        out_dir: Output folder: new, empty, or a previous output (``lr_finder.json``), which is
            replaced as a whole (checked before the sweep).
        config: The run configuration (``train.deterministic``: see
            :func:`cycleprune.training.enable_determinism`).
        checkpoint_dir: Where the sweep checkpoints itself, so that a rerun resumes it (see
            :func:`find_lr`): a folder or ``gs://bucket/prefix`` (worked on in a local copy,
            see :func:`cycleprune.mirror.mirrored_dir`); ``None``: no checkpoints.
        strategy: Distribution strategy; default
            :func:`cycleprune.distribution.select_strategy` (all visible GPUs).

    Returns:
        The :class:`LRFinderResult`.

    Raises:
        cycleprune.data.DataError: not a prepared dataset.
        LRFinderError: no usable descent.
        cycleprune.preemption.PreemptedError: SIGTERM; a checkpoint was written (with
            ``checkpoint_dir``), rerun to resume.
    """
    from cycleprune import data, distribution, losses, models, plots, precision, storage, training

    storage.check_output_dir(out_dir, replaces=_RESULT_FILE)
    if config.train.deterministic:
        training.enable_determinism(config.train.seed)
    strategy = strategy if strategy is not None else distribution.select_strategy()
    global_batch = distribution.global_batch_size(config.data.batch_size, strategy)
    info = data.load_info(dataset_dir, verify=True)
    weights = data.class_weights(info, config.data)
    dataset = data.make_dataset(
        dataset_dir,
        "train",
        dataclasses.replace(config.data, batch_size=global_batch),
        training=True,
        class_weight=weights,
    )
    fixed = config.schedule.has_bounds
    try:
        with contextlib.ExitStack() as stack:
            on_checkpoint = None
            if checkpoint_dir is not None and storage.is_gcs(checkpoint_dir):
                from cycleprune import mirror

                local = stack.enter_context(mirror.mirrored_dir(checkpoint_dir))
                checkpoint_dir, on_checkpoint = local.path, local.sync
            used = precision.stage_precision(
                config.train.precision, [checkpoint_dir] if checkpoint_dir is not None else []
            )
            stack.enter_context(precision.policy_scope(used))
            with strategy.scope():
                model = models.build_model(
                    config.model, info.image_shape, info.num_classes, seed=config.train.seed
                )
            result = find_lr(
                model,
                dataset,
                config.lr_finder,
                loss=losses.make_loss(config.train),
                optimizer=config.train.optimizer,
                momentum=sweep_momentum(config),
                checkpoint_dir=checkpoint_dir,
                on_checkpoint=on_checkpoint,
            )
    except LRFinderError as err:
        if not fixed or err.record is None:
            raise
        record = err.record
        result = LRFinderResult(
            lrs=record["lrs"],
            losses=record["losses"],
            smoothed=record["smoothed"],
            min_lr=config.schedule.min_lr,
            max_lr=config.schedule.max_lr,
            stopped_early=bool(record["stopped"]),
            steps=len(record["lrs"]),
            rule=config.lr_finder.rule,
            bounds_from="config",
            note=f"suggestion unavailable: {err}",
            optimizer=config.train.optimizer,
        )
    result = dataclasses.replace(result, precision=used)
    if fixed and result.bounds_from != "config":
        result = dataclasses.replace(
            result,
            min_lr=config.schedule.min_lr,
            max_lr=config.schedule.max_lr,
            bounds_from="config",
            suggested_min_lr=result.min_lr,
            suggested_max_lr=result.max_lr,
        )
    with storage.atomic_dir(out_dir, replaces=_RESULT_FILE) as tmp:
        storage.atomic_write_json(Path(tmp) / _RESULT_FILE, result.to_dict())
        plots.plot_lr_finder(
            result.lrs,
            result.losses,
            result.smoothed,
            result.min_lr,
            result.max_lr,
            Path(tmp) / "lr_finder.png",
        )
    return result
