"""``configure``: pipeline parameters -> one validated :class:`~cycleprune.config.Config`.

The configuration is resolved once, at the start of a run, so a bad value fails in seconds and
every later stage reads the same JSON (see :mod:`components.parameters` for the order and the
mapping). Two outputs: ``config``, a JSON artifact with the whole configuration (the training
stages read it), and ``data_config``, a string with only the fields
:func:`cycleprune.data.prepare_dataset` reads. ``prepare_data`` takes the second, so its cache key
changes with the data settings only: a new ``epochs`` reuses the cached dataset.

``config`` is an artifact rather than a string parameter because kfp.local (2.17) replaces task
output *parameters* consumed inside a ``ParallelFor`` with the loop item; artifacts pass intact.

``list_sparsities`` reads the resolved ``prune.sparsities`` back out of ``config`` as the pipeline's
fan-out list, so the ``ParallelFor`` runs the branches the configuration names: the preset's
unless the ``sparsities`` parameter or ``extra_config`` sets them. It is a component of its own
because kfp.local (2.17) iterates over a task's single ``Output`` only, not over one output of
several (``configure``'s ``data_config`` must stay a parameter of its own: see above).
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Input, Output

from components._base import component


@component
def configure(
    preset: str,
    class_names: list,
    batch_size: int,
    augment: bool,
    class_weight: str,
    seed: int,
    width: float,
    min_lr: float,
    max_lr: float,
    lr_policy: str,
    step_size_epochs: float,
    epochs: int,
    optimizer: str,
    momentum: float,
    loss: str,
    focal_gamma: float,
    focal_alpha: float,
    sparsities: list,
    prune_epochs: int,
    prune_end_epoch: int,
    prune_frequency: int,
    extra_config: str,
    config: Output[Artifact],
) -> NamedTuple("Outputs", [("data_config", str)]):
    """Resolve and validate the run configuration: preset, then parameters, then extra_config.

    `config`'s metadata holds the preset and `seconds` (this stage's work after its imports).
    """
    params = dict(locals())
    import json
    import time
    from collections import namedtuple

    from components.parameters import build_config, data_config
    from cycleprune import storage

    start = time.perf_counter()
    name, extra = params.pop("preset"), params.pop("extra_config")
    del params["config"]
    resolved = build_config(name, params, extra)
    print(resolved.to_yaml())
    storage.atomic_write_text(config.path, resolved.to_json() + "\n")
    data = json.dumps(data_config(resolved), sort_keys=True)
    config.metadata.update({"preset": name, "seconds": time.perf_counter() - start})
    return namedtuple("Outputs", ["data_config"])(data)


@component
def list_sparsities(config: Input[Artifact]) -> list:
    """The resolved configuration's ``prune.sparsities``: one prune branch each."""
    from pathlib import Path

    from cycleprune.config import Config

    sparsities = list(Config.from_json(Path(config.path).read_text()).prune.sparsities)
    print(f"Pruning branches, by target sparsity: {', '.join(f'{s:g}' for s in sparsities)}")
    return sparsities
