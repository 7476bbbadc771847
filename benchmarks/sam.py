"""Sharpness-aware minimisation (SAM) on `benchmarks.quality`'s chain (benchmark only).

SAM (Foret et al. 2021, https://arxiv.org/abs/2010.01412) takes each step's gradient at the worst
nearby weights instead of at the weights themselves::

    g     = grad L(w)                      (the usual forward and backward pass)
    e     = rho * g / ||g||                (||.||: the global L2 norm over every trainable weight)
    w    <- w - lr-step of grad L(w + e)   (a second forward and backward pass at w + e)

so a step costs two forward and two backward passes. What this implementation does beside that:

- After the second pass at ``w + e`` the weights are put back to the saved ``w`` (not ``w + e -
  e``, which rounds) before the optimizer applies the second gradient, so momentum and the CLR
  schedule see one step, as without SAM.
- BatchNorm's moving statistics (every non-trainable variable) are put back after the second
  pass, so they move once per step, from the first pass only, as in the reference implementation
  (``davda54/sam``'s ``disable_running_stats`` for the second pass).
- The loss and metrics reported are the first pass's, at ``w``.
- One replica, float32 only. Under ``MirroredStrategy`` the second loss would need scaling by
  the replica count and ``e`` would be each replica's own; under ``mixed_float16`` the loss is
  scaled. Both are refused, by the model's name (on a GPU, pass ``--set
  train.precision=float32``).

It is a screen of the idea on the dense model: ``python -m benchmarks.sam --rho 0.05 --preset
best --seeds 1 --dense-only`` takes ``benchmarks.quality``'s arguments after ``--rho`` and trains
every model that ``cycleprune.models.build_model`` builds with the SAM step. The LR range test's
model is built there too but runs its own step, so it is not affected; pruning clones the trained
model, which drops the step, so fine-tuning is plain SGD. It is not part of the library: a knob
that helps would move into ``cycleprune.training``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import types
from collections.abc import Iterator

import tensorflow as tf

from cycleprune.compat import keras

logger = logging.getLogger(__name__)


def sam_train_step(model: keras.Model, data, rho: float) -> dict:
    """One SAM step on ``model`` (compiled); returns the metrics, as ``Model.train_step`` does."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred, sample_weight)
    grads = tape.gradient(loss, variables)
    moving = [v.value() for v in model.non_trainable_variables]
    weights = [v.value() for v in variables]
    scale = rho / (tf.linalg.global_norm(grads) + 1e-12)
    for grad, variable in zip(grads, variables, strict=True):
        if grad is not None:
            variable.assign_add(grad * tf.cast(scale, grad.dtype))
    with tf.GradientTape() as tape:
        y_adv = model(x, training=True)
        loss_adv = model.loss(y, y_adv, sample_weight=sample_weight)
        if model.losses:
            loss_adv += tf.add_n(model.losses)
    grads_adv = tape.gradient(loss_adv, variables)
    for value, variable in zip(weights, variables, strict=True):
        variable.assign(value)
    for value, variable in zip(moving, model.non_trainable_variables, strict=True):
        variable.assign(value)
    model.optimizer.apply_gradients(zip(grads_adv, variables, strict=True))
    return model.compute_metrics(x, y, y_pred, sample_weight)


def with_sam(model: keras.Model, rho: float) -> keras.Model:
    """Give ``model`` the SAM step (before ``fit``'s first call builds the train function)."""
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"SAM's rho must be a positive number. Received: rho={rho}")
    if model.dtype_policy.compute_dtype != "float32":
        raise ValueError(
            f"SAM is only implemented in float32 (train.precision=float32). Received: model "
            f"{model.name!r} with dtype policy {model.dtype_policy.name!r}"
        )
    replicas = model.distribute_strategy.num_replicas_in_sync
    if replicas != 1:
        raise ValueError(
            f"SAM is only implemented on one replica. Received: model {model.name!r} built "
            f"under a strategy of {replicas} replicas"
        )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"Model {model.name!r} ({type(model).__name__}) has its own train_step; SAM would "
            "replace it"
        )
    logger.info("Model %r trains with the SAM step (rho=%s)", model.name, rho)
    model.train_step = types.MethodType(lambda self, data: sam_train_step(self, data, rho), model)
    return model


@contextlib.contextmanager
def sam_models(rho: float) -> Iterator[None]:
    """Inside, every model of ``cycleprune.models.build_model`` trains with the SAM step."""
    from cycleprune import models

    build = models.build_model

    def build_with_sam(*args, **kwargs):
        return with_sam(build(*args, **kwargs), rho)

    models.build_model = build_with_sam
    try:
        yield
    finally:
        models.build_model = build


def main(argv: list[str] | None = None) -> int:
    from benchmarks import quality

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other argument goes to benchmarks.quality.",
    )
    parser.add_argument("--rho", type=float, required=True, help="SAM's radius (e.g. 0.05)")
    args, rest = parser.parse_known_args(argv)
    if not (math.isfinite(args.rho) and args.rho > 0):
        parser.error(f"--rho must be a positive number. Received: {args.rho}")
    with sam_models(args.rho):
        return quality.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
