"""``select_model``: the deployed model, by the rule of :mod:`cycleprune.selection`."""

from typing import NamedTuple

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components._base import component


@component
def select_model(
    dense_evaluation: Input[Artifact],
    pruned_evaluations: Input[list[Artifact]],
    dense_models: Input[Model],
    pruned_models: Input[list[Model]],
    config: Input[Artifact],
    model: Output[Model],
    selection: Output[Artifact],
    metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("name", str), ("format", str)]):
    """Smallest (gzip) model whose validation AUC and sensitivity are within tolerance of the
    dense Keras model's; fallback: the dense model (cycleprune.selection, config.select).
    `seconds` in `selection`: this stage's work after its imports."""
    import os
    import shutil
    import time
    from collections import namedtuple
    from pathlib import Path

    from cycleprune import selection as rule
    from cycleprune import storage
    from cycleprune.config import Config

    start = time.perf_counter()
    cfg = Config.from_json(Path(config.path).read_text())
    evaluations = [storage.read_json(a.path) for a in [dense_evaluation, *pruned_evaluations]]
    entries = rule.collect_entries(evaluations)
    choice = rule.select_model(entries, cfg.select)
    folders = {m.metadata["variant"]: m.path for m in [dense_models, *pruned_models]}
    source = os.path.join(folders[choice.variant], choice.path)
    target = os.path.join(model.path, os.path.basename(choice.path))
    os.makedirs(model.path, exist_ok=True)
    if os.path.isdir(source):
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy2(source, target)
    chosen = next(e for e in entries if e["name"] == choice.name)
    model.metadata.update({"name": choice.name, "format": choice.format, "file": target})
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        metrics.log_metric(f"test_{key}", chosen["test"][key])
    metrics.log_metric("gzip_bytes", chosen["gzip_bytes"])
    print(choice.reason)
    seconds = time.perf_counter() - start
    storage.atomic_write_json(selection.path, {**choice.to_dict(), "seconds": seconds})
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
    return namedtuple("Outputs", ["name", "format"])(choice.name, choice.format)
