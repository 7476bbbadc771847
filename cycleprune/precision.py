"""Mixed precision: the precision a stage runs in, the Keras policy scope, loss scaling, export.

``train.precision`` chooses how the LR range test and training compute:

- ``float32``: everything in float32;
- ``mixed_float16``: Keras' ``mixed_float16`` policy: layers compute in float16 and keep float32
  variables, the ``predictions`` layer stays float32 (:func:`cycleprune.models.build_model`), and
  the optimizer is a dynamic ``keras.mixed_precision.LossScaleOptimizer`` (:func:`wrap_optimizer`),
  which skips the steps whose scaled gradients overflow and lowers the scale;
- ``auto`` (the default): ``mixed_float16`` when TensorFlow sees GPUs and every one has compute
  capability >= 7.0 (tensor cores: V100, T4, A100, L4, H100...), else ``float32``
  (:func:`resolve_precision`). Every visible GPU, not just one: the stages mirror over all of
  them, and a step is as slow as its slowest replica (TensorFlow's own mixed-precision check
  warns likewise as soon as one GPU is older).

The Keras dtype policy is process-global. :func:`policy_scope` sets it for the stage's model
building and training and restores the previous one afterwards, even on errors, so nothing leaks
into the next stage or test.

What a stage saves is float32 whatever it trained in (:func:`to_float32`, used by
:func:`cycleprune.training.save_model`): compression to TFLite and CPU evaluation never see a
float16 layer. The variables are float32 under ``mixed_float16`` anyway; only the layers' compute
dtype changes.

Checkpoints: a ``mixed_float16`` run's checkpoint also holds the loss scale (under
``optimizer/loss_scale/``), restored with the optimizer on resume. A float32 run can resume a
mixed-precision checkpoint (the loss scale is ignored), but not the reverse (there is no loss
scale to restore): :func:`stage_precision` makes ``auto`` continue a float32 checkpoint in
float32, and refuses an explicit ``mixed_float16`` for one, before anything is built.

Pruning fine-tuning stays float32 (see :data:`PRUNING_NOTE`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from cycleprune.compat import keras, tf

logger = logging.getLogger(__name__)

AUTO = "auto"
FLOAT32 = "float32"
MIXED = "mixed_float16"
# The values of train.precision (config.TrainConfig validates against the same tuple).
PRECISIONS = (AUTO, FLOAT32, MIXED)
# Tensor cores (Volta) and later: where mixed_float16 is faster than float32.
MIN_COMPUTE_CAPABILITY = (7, 0)
# Why run_pruning fine-tunes in float32 whatever train.precision says.
PRUNING_NOTE = (
    "pruning fine-tunes in float32: under mixed_float16, tfmot's prune_low_magnitude re-applies "
    "its masks on every forward pass with the kernel read as float16, which rounds the float32 "
    "master weights to float16 precision (and its wrapper around the float32 predictions layer "
    "fails with a float16/float32 dtype mismatch)"
)
_LOSS_SCALE_KEY = "loss_scale/current_loss_scale"


def gpu_details() -> list[dict]:
    """``tf.config.experimental.get_device_details`` of every GPU TensorFlow sees."""
    return [
        tf.config.experimental.get_device_details(gpu)
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def resolve_precision(setting: str, gpus: Iterable[Mapping[str, Any]] | None = None) -> str:
    """The precision ``train.precision = setting`` means on this machine.

    ``float32`` and ``mixed_float16`` are themselves. ``auto`` is ``mixed_float16`` when there
    is at least one GPU and every one has a ``compute_capability`` of at least
    :data:`MIN_COMPUTE_CAPABILITY` (7.0), else ``float32``.

    Args:
        setting: ``auto``, ``float32`` or ``mixed_float16``.
        gpus: The GPUs' device details, e.g. ``[{"compute_capability": (7, 0)}]`` (what
            ``tf.config.experimental.get_device_details`` returns); default: :func:`gpu_details`.

    Returns:
        ``"float32"`` or ``"mixed_float16"``.

    Raises:
        ValueError: an unknown ``setting``.
    """
    if setting not in PRECISIONS:
        raise ValueError(
            f"Argument `setting` must be one of {', '.join(PRECISIONS)}. Received: {setting!r}"
        )
    if setting != AUTO:
        return setting
    details = gpu_details() if gpus is None else list(gpus)
    capabilities = [_capability(d) for d in details]
    if capabilities and all(c >= MIN_COMPUTE_CAPABILITY for c in capabilities):
        return MIXED
    return FLOAT32


def _capability(details: Mapping[str, Any]) -> tuple[int, int]:
    """A GPU's compute capability; (0, 0) when unknown (it then does not count as capable)."""
    value = details.get("compute_capability") if isinstance(details, Mapping) else None
    try:
        major, minor = value  # type: ignore[misc]
        return int(major), int(minor)
    except (TypeError, ValueError):
        return (0, 0)


def checkpoint_precision(path: str) -> str:
    """``mixed_float16`` if the checkpoint ``path`` (a prefix) holds a loss scale, else
    ``float32``.

    Raises:
        tf.errors.OpError, ValueError: an unreadable checkpoint.
    """
    reader = tf.train.load_checkpoint(path)
    keys = reader.get_variable_to_shape_map()
    return MIXED if any(_LOSS_SCALE_KEY in key for key in keys) else FLOAT32


def _found_checkpoint(folders: Iterable[str | os.PathLike]) -> tuple[str, str] | None:
    """(precision, path) of the newest readable checkpoint of the first folder that has one."""
    for folder in folders:
        state = tf.train.get_checkpoint_state(str(folder)) if os.path.isdir(folder) else None
        for path in reversed(list(state.all_model_checkpoint_paths) if state else []):
            try:
                return checkpoint_precision(path), path
            except (tf.errors.OpError, ValueError, IndexError):
                continue
    return None


def stage_precision(
    setting: str,
    checkpoint_dirs: Sequence[str | os.PathLike] = (),
    *,
    gpus: Iterable[Mapping[str, Any]] | None = None,
) -> str:
    """The precision a stage runs in: :func:`resolve_precision`, made to fit its checkpoints.

    A run keeps resuming from its checkpoints whatever the machine: when the newest checkpoint
    in ``checkpoint_dirs`` (searched in order) was written in float32 and ``setting`` resolves
    to ``mixed_float16``, ``auto`` continues in float32 (logged), and an explicit
    ``mixed_float16`` raises (a float32 checkpoint has no loss scale to restore). A
    mixed-precision checkpoint resumes in either precision (in float32 its loss scale is
    ignored).

    Args:
        setting: ``train.precision``.
        checkpoint_dirs: The stage's checkpoint folders (``tf.train.CheckpointManager``
            folders); missing ones are skipped.
        gpus: Device details for :func:`resolve_precision`.

    Returns:
        ``"float32"`` or ``"mixed_float16"``.

    Raises:
        ValueError: an unknown ``setting``, or ``mixed_float16`` asked for to resume a float32
            checkpoint.
    """
    wanted = resolve_precision(setting, gpus)
    found = _found_checkpoint(checkpoint_dirs)
    if found is None or found[0] == wanted:
        return wanted
    found_precision, path = found
    if wanted == FLOAT32:
        logger.info("Resuming %s (mixed_float16) in float32: its loss scale is ignored.", path)
        return FLOAT32
    if setting == AUTO:
        logger.info(
            "train.precision=auto would be mixed_float16 here, but %s was written in float32: "
            "the run continues in float32.",
            path,
        )
        return FLOAT32
    raise ValueError(
        f"train.precision=mixed_float16 cannot resume {path}, written in {found_precision} "
        "(it has no loss scale): set train.precision to float32 or auto, or use an empty "
        "checkpoint folder for a new run."
    )


@contextlib.contextmanager
def policy_scope(precision: str) -> Iterator[None]:
    """Set Keras' global dtype policy to ``precision`` inside the block, restoring the previous
    policy on the way out (also on errors).

    Build the model inside it: a layer's policy is fixed when the layer is created.

    Raises:
        ValueError: ``precision`` is not ``float32`` or ``mixed_float16``.
    """
    if precision not in (FLOAT32, MIXED):
        raise ValueError(
            f"Argument `precision` must be {FLOAT32} or {MIXED} (resolve 'auto' first). "
            f"Received: {precision!r}"
        )
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def wrap_optimizer(
    optimizer: keras.optimizers.Optimizer, precision: str
) -> keras.optimizers.Optimizer:
    """``optimizer`` in a dynamic ``LossScaleOptimizer`` for ``mixed_float16``, else itself.

    Wrap before ``compile``: ``Model.compile`` wraps only an optimizer that is not one already.
    The wrapper delegates ``iterations`` (the global step: a skipped overflow step counts too, so
    a schedule of the step stays on time), ``learning_rate`` and its checkpoint layout to the
    inner optimizer, plus ``loss_scale/`` with the scale's state. Create it in the same
    distribution-strategy scope as the model.
    """
    if precision == MIXED and not is_loss_scaled(optimizer):
        return keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def is_loss_scaled(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a Keras ``LossScaleOptimizer``."""
    return isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer a ``LossScaleOptimizer`` wraps (its schedule, momentum...); else itself."""
    return optimizer.inner_optimizer if is_loss_scaled(optimizer) else optimizer


def to_float32(model: keras.Model) -> keras.Model:
    """A float32 copy of ``model``: every float16/bfloat16-compute layer becomes float32.

    The architecture is cloned (nested models and wrapped layers included) with each
    mixed-precision layer's ``dtype`` set to ``float32``, under the float32 policy, and the
    weights are copied (a mixed-precision layer's variables are float32 already). Layers that
    already compute in float32, or in a non-float dtype, are cloned unchanged.

    Returns:
        An uncompiled model that computes what ``model`` computes, in float32.
    """
    with policy_scope(FLOAT32):
        copy = keras.models.clone_model(model, clone_function=_float32_layer)
    copy.set_weights(model.get_weights())
    return copy


def _float32_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    if isinstance(layer, keras.Model):
        return keras.models.clone_model(layer, clone_function=_float32_layer)
    config = layer.get_config()
    if _is_half(layer):
        config["dtype"] = FLOAT32
    inner = getattr(layer, "layer", None)
    nested = config.get("layer")
    if isinstance(layer, keras.layers.Wrapper) and _is_half(inner) and isinstance(nested, dict):
        config["layer"] = {**nested, "config": {**nested.get("config", {}), "dtype": FLOAT32}}
    return layer.__class__.from_config(config)


def _is_half(layer: Any) -> bool:
    policy = getattr(layer, "dtype_policy", None)
    return getattr(policy, "compute_dtype", None) in ("float16", "bfloat16")
