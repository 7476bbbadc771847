"""Cyclical learning rates and momentum (Smith 2017), computed in the graph.

Layers, bottom up: :func:`clr` is the closed form in numpy (the reference for tests and plots);
:class:`CyclicalLearningRate` and :class:`CyclicalMomentum` are the same maths in TF ops, as
serialisable ``LearningRateSchedule`` objects evaluated from the optimizer's step counter;
:class:`CyclicalSGD` is SGD whose momentum follows a :class:`CyclicalMomentum`; and
:func:`make_optimizer` builds the optimizer a config asks for. No per-batch Python callback sets
anything.

Reference: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017,
https://arxiv.org/abs/1506.01186. For iteration ``it`` and half-cycle ``step_size``::

    cycle = floor(1 + it / (2 * step_size))
    x     = |it / step_size - 2 * cycle + 1|
    lr    = min_lr + (max_lr - min_lr) * max(0, 1 - x) * scale

with ``scale = 1`` (``triangular``), ``1 / 2**(cycle - 1)`` (``triangular2``) or
``gamma**it`` (``exp_range``).
"""

from __future__ import annotations

import math

import numpy as np

from cycleprune.compat import keras, tf
from cycleprune.config import POLICIES, ScheduleConfig, TrainConfig


def clr(
    iterations: np.ndarray | int,
    min_lr: float,
    max_lr: float,
    step_size: float,
    policy: str = "triangular",
    gamma: float = 1.0,
) -> np.ndarray:
    """Smith's cyclical learning rate at the given iterations (pure numpy, float64).

    Args:
        iterations: Iteration(s), 0-based (the optimizer step before the update).
        min_lr: Lower bound (``base_lr``), >= 0.
        max_lr: Upper bound, > ``min_lr``.
        step_size: Half-cycle length in iterations, > 0.
        policy: ``triangular``, ``triangular2`` or ``exp_range``.
        gamma: Per-iteration decay of ``exp_range``, in (0, 1].

    Returns:
        The learning rate(s), same shape as ``iterations``.

    Raises:
        ValueError: an invalid argument.
    """
    _validate("min_lr", min_lr, "max_lr", max_lr, step_size, policy, gamma)
    it = np.asarray(iterations, dtype=np.float64)
    cycle = np.floor(1.0 + it / (2.0 * step_size))
    x = np.abs(it / step_size - 2.0 * cycle + 1.0)
    return min_lr + (max_lr - min_lr) * np.maximum(0.0, 1.0 - x) * _np_scale(
        policy, cycle, it, gamma
    )


def clr_momentum(
    iterations: np.ndarray | int,
    min_momentum: float,
    max_momentum: float,
    step_size: float,
    policy: str = "triangular",
    gamma: float = 1.0,
) -> np.ndarray:
    """Cyclical momentum, the mirror image of :func:`clr` (pure numpy).

    ``momentum = max_momentum - (max_momentum - min_momentum) * max(0, 1 - x) * scale``: high when
    the LR is low and low when the LR peaks, with the same ``scale`` as the LR policy, as in
    PyTorch's ``CyclicLR(cycle_momentum=True)`` (Smith 2018, https://arxiv.org/abs/1803.09820).

    Raises:
        ValueError: an invalid argument.
    """
    _validate("min_momentum", min_momentum, "max_momentum", max_momentum, step_size, policy, gamma)
    it = np.asarray(iterations, dtype=np.float64)
    cycle = np.floor(1.0 + it / (2.0 * step_size))
    x = np.abs(it / step_size - 2.0 * cycle + 1.0)
    height = (max_momentum - min_momentum) * np.maximum(0.0, 1.0 - x)
    return max_momentum - height * _np_scale(policy, cycle, it, gamma)


def _np_scale(policy: str, cycle: np.ndarray, it: np.ndarray, gamma: float) -> np.ndarray:
    if policy == "triangular":
        return np.ones_like(it)
    if policy == "triangular2":
        return 1.0 / 2.0 ** (cycle - 1.0)
    return gamma**it


def _validate(
    low_name: str, low: float, high_name: str, high: float, step_size, policy, gamma
) -> None:
    if not low >= 0:
        raise ValueError(f"Argument `{low_name}` must be >= 0. Received: {low_name}={low}")
    if not high > low:
        raise ValueError(
            f"Argument `{low_name}` must be < `{high_name}`. Received: {low_name}={low}, "
            f"{high_name}={high}"
        )
    if not step_size > 0:
        raise ValueError(f"Argument `step_size` must be > 0. Received: step_size={step_size}")
    if policy not in POLICIES:
        raise ValueError(
            f"Argument `policy` must be one of {', '.join(POLICIES)}. Received: policy={policy!r}"
        )
    if not 0 < gamma <= 1:
        raise ValueError(f"Argument `gamma` must be in (0, 1]. Received: gamma={gamma}")


def _tf_triangle(step, step_size: float, policy: str, gamma: float):
    """(max(0, 1 - x), scale) for a step tensor, in float64; the core of the TF schedules."""
    # float64: in float32, `1 - x` loses digits late in training and gamma**step drifts (the
    # float32 rounding of gamma, raised to the step) by ~1e-4 relative after a few thousand steps.
    step = tf.cast(step, tf.float64)
    step_size = tf.constant(step_size, tf.float64)
    cycle = tf.floor(1.0 + step / (2.0 * step_size))
    x = tf.abs(step / step_size - 2.0 * cycle + 1.0)
    triangle = tf.maximum(tf.constant(0.0, tf.float64), 1.0 - x)
    if policy == "triangular":
        scale = tf.constant(1.0, tf.float64)
    elif policy == "triangular2":
        scale = 1.0 / tf.pow(tf.constant(2.0, tf.float64), cycle - 1.0)
    else:
        scale = tf.pow(tf.constant(gamma, tf.float64), step)
    return triangle, scale


@keras.utils.register_keras_serializable(package="cycleprune")
class CyclicalLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's cyclical learning rate as a serialisable, in-graph Keras schedule.

    ``lr(it) = min_lr + (max_lr - min_lr) * max(0, 1 - x) * scale`` with
    ``cycle = floor(1 + it / (2 * step_size))``, ``x = |it / step_size - 2 * cycle + 1|`` and
    ``scale`` = 1 (``triangular``), ``1 / 2**(cycle - 1)`` (``triangular2``) or ``gamma**it``
    (``exp_range``). Computed in float64 and returned as float32; equals :func:`clr`.

    Reference: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017.

    Args:
        min_lr: Lower bound, >= 0.
        max_lr: Upper bound, > ``min_lr``.
        step_size: Half-cycle length in optimizer steps, > 0.
        policy: ``triangular``, ``triangular2`` or ``exp_range``.
        gamma: Per-step decay of ``exp_range``, in (0, 1].
        name: Name scope of the ops.

    Raises:
        ValueError: an invalid argument (the message names it and its value).
    """

    def __init__(
        self,
        min_lr: float,
        max_lr: float,
        step_size: float,
        policy: str = "triangular",
        gamma: float = 1.0,
        name: str = "CyclicalLearningRate",
    ) -> None:
        super().__init__()
        _validate("min_lr", min_lr, "max_lr", max_lr, step_size, policy, gamma)
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.step_size = float(step_size)
        self.policy = policy
        self.gamma = float(gamma)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            triangle, scale = _tf_triangle(step, self.step_size, self.policy, self.gamma)
            lr = self.min_lr + (self.max_lr - self.min_lr) * triangle * scale
            return tf.cast(lr, tf.float32)

    def get_config(self) -> dict:
        return {
            "min_lr": self.min_lr,
            "max_lr": self.max_lr,
            "step_size": self.step_size,
            "policy": self.policy,
            "gamma": self.gamma,
            "name": self.name,
        }


@keras.utils.register_keras_serializable(package="cycleprune")
class CyclicalMomentum(keras.optimizers.schedules.LearningRateSchedule):
    """Cyclical momentum, moving opposite to :class:`CyclicalLearningRate` (in-graph).

    ``momentum(it) = max_momentum - (max_momentum - min_momentum) * max(0, 1 - x) * scale``, with
    ``x`` and ``scale`` as for the LR: ``max_momentum`` at the LR's minimum, ``min_momentum`` at
    its peak (Smith 2018, "A disciplined approach to neural network hyper-parameters",
    https://arxiv.org/abs/1803.09820; PyTorch ``CyclicLR(cycle_momentum=True)``). Equals
    :func:`clr_momentum`.

    Args:
        min_momentum: Lower bound, >= 0.
        max_momentum: Upper bound, > ``min_momentum`` and <= 1.
        step_size: Half-cycle length in optimizer steps, > 0.
        policy: ``triangular``, ``triangular2`` or ``exp_range`` (the LR's policy).
        gamma: Per-step decay of ``exp_range``, in (0, 1].
        name: Name scope of the ops.

    Raises:
        ValueError: an invalid argument.
    """

    def __init__(
        self,
        min_momentum: float,
        max_momentum: float,
        step_size: float,
        policy: str = "triangular",
        gamma: float = 1.0,
        name: str = "CyclicalMomentum",
    ) -> None:
        super().__init__()
        _validate(
            "min_momentum", min_momentum, "max_momentum", max_momentum, step_size, policy, gamma
        )
        if not max_momentum <= 1:
            raise ValueError(
                f"Argument `max_momentum` must be <= 1. Received: max_momentum={max_momentum}"
            )
        self.min_momentum = float(min_momentum)
        self.max_momentum = float(max_momentum)
        self.step_size = float(step_size)
        self.policy = policy
        self.gamma = float(gamma)
        self.name = name

    def __call__(self, step):
        with tf.name_scope(self.name):
            triangle, scale = _tf_triangle(step, self.step_size, self.policy, self.gamma)
            height = (self.max_momentum - self.min_momentum) * triangle * scale
            return tf.cast(self.max_momentum - height, tf.float32)

    def get_config(self) -> dict:
        return {
            "min_momentum": self.min_momentum,
            "max_momentum": self.max_momentum,
            "step_size": self.step_size,
            "policy": self.policy,
            "gamma": self.gamma,
            "name": self.name,
        }


@keras.utils.register_keras_serializable(package="cycleprune")
class CyclicalSGD(keras.optimizers.SGD):
    """SGD whose momentum follows a schedule of the step counter, evaluated in the graph.

    The update is Keras' SGD (``v = m * v - lr * g; w = w + v``, or the Nesterov variant) with
    ``m = momentum_schedule(iterations)`` at each step, the same step the LR schedule sees.
    Without a schedule it is plain ``SGD(momentum=momentum)``.

    Args:
        learning_rate: A float or a ``LearningRateSchedule`` (e.g. :class:`CyclicalLearningRate`).
        momentum_schedule: A :class:`CyclicalMomentum` (or any schedule of the step), or its
            serialised config.
        momentum: Constant momentum, used only without ``momentum_schedule``.
        **kwargs: Other ``keras.optimizers.SGD`` arguments.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum_schedule=None,
        momentum: float = 0.0,
        nesterov: bool = False,
        name: str = "CyclicalSGD",
        **kwargs,
    ) -> None:
        if isinstance(momentum_schedule, dict):
            momentum_schedule = keras.optimizers.schedules.deserialize(momentum_schedule)
        if momentum_schedule is not None and not callable(momentum_schedule):
            raise ValueError(
                "Argument `momentum_schedule` must be a schedule of the step or None. "
                f"Received: momentum_schedule={momentum_schedule!r}"
            )
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs
        )
        self.momentum_schedule = momentum_schedule

    @property
    def current_momentum(self):
        """The momentum the next update will use."""
        if self.momentum_schedule is None:
            return tf.constant(self.momentum, tf.float32)
        return self.momentum_schedule(self.iterations)

    def update_step(self, gradient, variable):
        if self.momentum_schedule is None:
            return super().update_step(gradient, variable)
        lr = tf.cast(self.learning_rate, variable.dtype)
        momentum = tf.cast(self.momentum_schedule(self.iterations), variable.dtype)
        m = self.momentums[self._index_dict[self._var_key(variable)]]
        if isinstance(gradient, tf.IndexedSlices):
            m.assign(m * momentum)
            m.scatter_add(tf.IndexedSlices(-gradient.values * lr, gradient.indices))
            if self.nesterov:
                variable.scatter_add(tf.IndexedSlices(-gradient.values * lr, gradient.indices))
                variable.assign_add(m * momentum)
            else:
                variable.assign_add(m)
        else:
            m.assign(-gradient * lr + m * momentum)
            if self.nesterov:
                variable.assign_add(-gradient * lr + m * momentum)
            else:
                variable.assign_add(m)

    def get_config(self) -> dict:
        config = super().get_config()
        config["momentum_schedule"] = (
            None
            if self.momentum_schedule is None
            else keras.optimizers.schedules.serialize(self.momentum_schedule)
        )
        return config


def clr_step_size(steps_per_epoch: int, step_size_epochs: float) -> int:
    """The CLR half-cycle in optimizer steps: ``max(1, round(step_size_epochs * steps_per_epoch))``.

    Smith (2017) recommends 2-10 epochs per half cycle; the article uses 4.

    Raises:
        ValueError: ``steps_per_epoch`` < 1 or ``step_size_epochs`` <= 0.
    """
    if (
        isinstance(steps_per_epoch, bool)
        or int(steps_per_epoch) != steps_per_epoch
        or (steps_per_epoch < 1)
    ):
        raise ValueError(
            f"Argument `steps_per_epoch` must be an int >= 1. Received: "
            f"steps_per_epoch={steps_per_epoch}"
        )
    if not step_size_epochs > 0:
        raise ValueError(
            "Argument `step_size_epochs` must be > 0. Received: "
            f"step_size_epochs={step_size_epochs}"
        )
    return max(1, round(step_size_epochs * steps_per_epoch))


def whole_cycle_epochs(epochs: int, step_size_epochs: float) -> int:
    """``epochs`` rounded up to a whole number of CLR cycles (one cycle = 2 half-cycles).

    Ending a triangular cycle at its minimum LR is where Smith (2017) finds the best accuracy.
    E.g. 5 epochs with 2-epoch half cycles -> 8; 32 epochs with 4-epoch half cycles -> 32.

    Raises:
        ValueError: ``epochs`` < 1 or ``step_size_epochs`` <= 0.
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise ValueError(f"Argument `epochs` must be an int >= 1. Received: epochs={epochs}")
    if not step_size_epochs > 0:
        raise ValueError(
            "Argument `step_size_epochs` must be > 0. Received: "
            f"step_size_epochs={step_size_epochs}"
        )
    cycle = 2.0 * step_size_epochs
    cycles = math.ceil(epochs / cycle - 1e-9)
    return max(int(epochs), math.ceil(cycles * cycle - 1e-9))


def ends_on_cycle_minimum(epochs: int, steps_per_epoch: int, step_size: int) -> bool:
    """Whether ``epochs`` of ``steps_per_epoch`` steps are whole cycles of ``2 * step_size``.

    :func:`whole_cycle_epochs` rounds in epochs and :func:`clr_step_size` in steps, so with a
    ``step_size_epochs`` whose half cycle is not a whole number of epochs (or of steps) the
    rounded-up run can still end mid-cycle, at an LR well above ``min_lr``.
    """
    return (epochs * steps_per_epoch) % (2 * step_size) == 0


def make_optimizer(
    train: TrainConfig,
    schedule: ScheduleConfig,
    *,
    min_lr: float,
    max_lr: float,
    steps_per_epoch: int,
) -> keras.optimizers.Optimizer:
    """The training optimizer: SGD with momentum or Adam, under a cyclical learning rate.

    The LR is a :class:`CyclicalLearningRate` from ``min_lr`` to ``max_lr`` with
    ``step_size = clr_step_size(steps_per_epoch, schedule.step_size_epochs)`` and the schedule's
    policy and gamma. With ``schedule.cyclical_momentum`` the optimizer is a :class:`CyclicalSGD`
    whose momentum cycles between ``schedule.min_momentum`` and ``schedule.max_momentum``
    (``train.momentum`` is then unused); otherwise SGD uses the constant ``train.momentum``.

    Args:
        train: ``optimizer`` (``sgd`` or ``adam``) and ``momentum``.
        schedule: Policy, gamma, half-cycle in epochs, cyclical momentum settings.
        min_lr, max_lr: CLR bounds (from the config or the LR range test).
        steps_per_epoch: Optimizer steps per epoch.

    Returns:
        An uncompiled Keras optimizer.

    Raises:
        ValueError: bad bounds or steps, an unknown optimizer, or cyclical momentum with Adam.
    """
    step_size = clr_step_size(steps_per_epoch, schedule.step_size_epochs)
    if not min_lr > 0:
        raise ValueError(f"Argument `min_lr` must be > 0. Received: min_lr={min_lr}")
    learning_rate = CyclicalLearningRate(
        min_lr, max_lr, step_size, policy=schedule.policy, gamma=schedule.gamma
    )
    if train.optimizer == "sgd":
        if schedule.cyclical_momentum and schedule.min_momentum < schedule.max_momentum:
            momentum = CyclicalMomentum(
                schedule.min_momentum,
                schedule.max_momentum,
                step_size,
                policy=schedule.policy,
                gamma=schedule.gamma,
            )
            return CyclicalSGD(learning_rate=learning_rate, momentum_schedule=momentum)
        if schedule.cyclical_momentum:  # min == max: a cycle of zero height
            return keras.optimizers.SGD(learning_rate=learning_rate, momentum=schedule.max_momentum)
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=train.momentum)
    if train.optimizer == "adam":
        if schedule.cyclical_momentum:
            raise ValueError(
                "Cyclical momentum needs SGD. Received: train.optimizer='adam' with "
                "schedule.cyclical_momentum=True"
            )
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"Unknown optimizer. Received: optimizer={train.optimizer!r}")
