"""The article's way of cycling the learning rate: a per-batch Python callback (benchmark only).

A port of the ``CyclicLR`` callback of https://github.com/bckenstler/CLR (``clr_callback.py``),
which the article uses, to ``tf_keras``: at the end of every batch it counts the iteration, appends
the optimizer's current LR (read with ``keras.backend.get_value``), the iteration and every
entry of the batch's ``logs`` to ``self.history``, computes the next LR in Python (Smith 2017)::

    cycle = floor(1 + clr_iterations / (2 * step_size))
    x     = |clr_iterations / step_size - 2 * cycle + 1|
    lr    = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale_fn(cycle or clr_iterations)

and writes it with ``keras.backend.set_value``. Only names differ from the original:
``on_train_batch_end`` is the TF2 name of its ``on_batch_end``, and ``optimizer.learning_rate``
that of ``optimizer.lr`` (an alias that Keras' mixed-precision ``LossScaleOptimizer`` lacks).
Because the callback reads the batch logs, Keras converts them to Python numbers after every
step, as it did for the article.

This is what ``cycleprune`` replaces with an in-graph schedule
(:class:`cycleprune.schedules.CyclicalLearningRate`); it lives in ``benchmarks/`` to measure
the difference and is not part of the library.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cycleprune.compat import keras

_MODES = ("triangular", "triangular2", "exp_range")


class CyclicLR(keras.callbacks.Callback):
    """Cyclical learning rate set from Python after every batch (bckenstler/CLR).

    Args:
        base_lr: Lower bound (the LR of the first batch).
        max_lr: Upper bound.
        step_size: Half-cycle length in iterations.
        mode: ``triangular``, ``triangular2`` or ``exp_range`` (ignored with ``scale_fn``).
        gamma: Per-iteration decay of ``exp_range``.
        scale_fn: Custom amplitude scaling ``f(x)``, or ``None``.
        scale_mode: ``cycle`` (``scale_fn`` of the cycle) or ``iterations``.
    """

    def __init__(
        self,
        base_lr: float = 0.001,
        max_lr: float = 0.006,
        step_size: float = 2000.0,
        mode: str = "triangular",
        gamma: float = 1.0,
        scale_fn: Callable[[float], float] | None = None,
        scale_mode: str = "cycle",
    ) -> None:
        super().__init__()
        if scale_fn is None and mode not in _MODES:
            raise ValueError(
                f"Argument `mode` must be one of {', '.join(_MODES)}. Received: {mode=}"
            )
        self.base_lr = base_lr
        self.max_lr = max_lr
        self.step_size = step_size
        self.mode = mode
        self.gamma = gamma
        if scale_fn is None:
            if mode == "triangular":
                self.scale_fn, self.scale_mode = (lambda x: 1.0), "cycle"
            elif mode == "triangular2":
                self.scale_fn, self.scale_mode = (lambda x: 1 / (2.0 ** (x - 1))), "cycle"
            else:
                self.scale_fn, self.scale_mode = (lambda x: gamma**x), "iterations"
        else:
            self.scale_fn, self.scale_mode = scale_fn, scale_mode
        self.clr_iterations = 0.0
        self.trn_iterations = 0.0
        self.history: dict[str, list] = {}
        self._reset()

    def _reset(
        self,
        new_base_lr: float | None = None,
        new_max_lr: float | None = None,
        new_step_size: float | None = None,
    ) -> None:
        """Restart the cycle, optionally with new bounds or step size."""
        if new_base_lr is not None:
            self.base_lr = new_base_lr
        if new_max_lr is not None:
            self.max_lr = new_max_lr
        if new_step_size is not None:
            self.step_size = new_step_size
        self.clr_iterations = 0.0

    def clr(self) -> float:
        cycle = np.floor(1 + self.clr_iterations / (2 * self.step_size))
        x = np.abs(self.clr_iterations / self.step_size - 2 * cycle + 1)
        scale_arg = cycle if self.scale_mode == "cycle" else self.clr_iterations
        return self.base_lr + (self.max_lr - self.base_lr) * np.maximum(0, (1 - x)) * self.scale_fn(
            scale_arg
        )

    def on_train_begin(self, logs=None):
        if self.clr_iterations == 0:
            keras.backend.set_value(self.model.optimizer.learning_rate, self.base_lr)
        else:
            keras.backend.set_value(self.model.optimizer.learning_rate, self.clr())

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.trn_iterations += 1
        self.clr_iterations += 1
        self.history.setdefault("lr", []).append(
            keras.backend.get_value(self.model.optimizer.learning_rate)
        )
        self.history.setdefault("iterations", []).append(self.trn_iterations)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        keras.backend.set_value(self.model.optimizer.learning_rate, self.clr())
