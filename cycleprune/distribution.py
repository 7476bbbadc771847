"""Data-parallel training on the devices of one machine (``tf.distribute.MirroredStrategy``).

:func:`select_strategy` picks the strategy: a ``MirroredStrategy`` over the visible GPUs when
there are two or more (or over the devices asked for), else TensorFlow's default strategy (one
device, no copies). Training, the LR range test and pruning build their model, optimizer and
metrics inside ``strategy.scope()`` and feed batches of the *global* size,
``per_replica * replicas`` (:func:`global_batch_size`): each replica computes the gradients of
its share of a batch, and the strategy sums them before the one update. Steps per epoch follow
from the global batch, so with 2 replicas an epoch has half the steps, and every schedule
measured in steps (the cyclical LR's ``step_size``, the pruning schedule) is derived from those
steps in one place.

Multi-node training is not done here: see the README ("Multi-GPU and multi-node").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cycleprune.compat import tf

logger = logging.getLogger(__name__)


def select_strategy(devices: Sequence[str] | None = None) -> tf.distribute.Strategy:
    """The distribution strategy for this process.

    Args:
        devices: Devices to mirror over, e.g. ``["/cpu:0", "/cpu:1"]`` (two logical CPUs in
            tests) or ``["/gpu:0", "/gpu:1"]``. ``None``: every visible GPU.

    Returns:
        A ``MirroredStrategy`` when ``devices`` is given or more than one GPU is visible;
        otherwise ``tf.distribute.get_strategy()`` (the default strategy: one device).

    Raises:
        ValueError: ``devices`` is empty or names a device twice.
    """
    if devices is not None:
        names = [str(d) for d in devices]
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"Argument `devices` must name at least one device, each once. Received: {devices}"
            )
        return tf.distribute.MirroredStrategy(names)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([g.name for g in gpus])
    return tf.distribute.get_strategy()


def replicas(strategy: tf.distribute.Strategy) -> int:
    """Replicas (model copies) that take part in every step."""
    return int(strategy.num_replicas_in_sync)


def global_batch_size(per_replica: int, strategy: tf.distribute.Strategy) -> int:
    """``per_replica * replicas(strategy)``: the batch one optimizer step consumes.

    Raises:
        ValueError: ``per_replica`` < 1.
    """
    if isinstance(per_replica, bool) or not isinstance(per_replica, int) or per_replica < 1:
        raise ValueError(f"Argument `per_replica` must be an int >= 1. Received: {per_replica=}")
    return per_replica * replicas(strategy)


def describe(strategy: tf.distribute.Strategy) -> dict:
    """``{"strategy": class name, "replicas": n, "devices": [...]}`` for histories and logs."""
    try:
        devices = tuple(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list: the current device
        devices = ()
    return {
        "strategy": type(strategy).__name__,
        "replicas": replicas(strategy),
        "devices": [str(d) for d in devices],
    }


def check_gpus(requested: int) -> int:
    """Compare the GPUs a pipeline task asked for with the GPUs this process sees.

    In a pod the NVIDIA device plugin exposes exactly the task's accelerator limit, so the two
    agree; they differ when the CPU-only pipeline variant is run with ``gpus > 0`` (it requests
    none) or when a local run sees a GPU. Every visible GPU is used either way.

    Args:
        requested: The ``gpus`` pipeline parameter.

    Returns:
        The number of visible GPUs.

    Raises:
        ValueError: ``requested`` < 0.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"Argument `requested` must be an int >= 0. Received: {requested=}")
    visible = len(tf.config.list_physical_devices("GPU"))
    if requested > visible:
        logger.warning(
            "gpus=%d was requested but %d GPU(s) are visible: running on %s. (The CPU-only "
            "pipeline variant requests no GPU whatever `gpus` says.)",
            requested,
            visible,
            f"{visible} GPU(s)" if visible else "the CPU",
        )
    elif requested != visible:
        logger.info("gpus=%d requested, %d visible: using all %d.", requested, visible, visible)
    return visible
