"""``push``: the selected model into the registry as a version; production moves only if the
candidate passes the promotion gate (cycleprune.registry)."""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._base import component


@component
def push(
    selection: Input[Artifact],
    dense_evaluation: Input[Artifact],
    pruned_evaluations: Input[list[Artifact]],
    dense_models: Input[Model],
    pruned_models: Input[list[Model]],
    dataset: Input[Dataset],
    dataset_info: Input[Artifact],
    config: Input[Artifact],
    registry: str,
    model_name: str,
    min_auc: float,
    min_sensitivity: float,
    min_specificity: float,
    promotion_tolerance: float,
    run_id: str,
    decision: Output[Artifact],
    page: Output[HTML],
    metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("version", str), ("promoted", bool)]):
    """Push to <registry>/<model_name>/<version>/ and gate: thresholds, then not worse than
    the production model on this run's test split. An empty registry skips the stage.
    `seconds` in `decision`: this stage's work after its imports."""
    import math
    import time
    from collections import namedtuple
    from pathlib import Path

    from cycleprune import registry as models
    from cycleprune import report, storage

    start = time.perf_counter()
    outputs = namedtuple("Outputs", ["version", "promoted"])
    if not registry.strip():
        storage.atomic_write_text(page.path, report.push_html(None))
        seconds = time.perf_counter() - start
        storage.atomic_write_json(decision.path, {"skipped": True, "seconds": seconds})
        return outputs("", False)
    record = models.run_push(
        registry.strip(),
        model_name,
        selection=storage.read_json(selection.path),
        evaluations=[storage.read_json(a.path) for a in [dense_evaluation, *pruned_evaluations]],
        model_dirs={m.metadata["variant"]: m.path for m in [dense_models, *pruned_models]},
        dataset_dir=dataset.path,
        dataset_info=storage.read_json(dataset_info.path),
        parameters=storage.read_json(Path(config.path)),
        gate=models.GateConfig(min_auc, min_sensitivity, min_specificity, promotion_tolerance),
        parent_run=run_id,
    )
    storage.atomic_write_text(page.path, report.push_html(record))
    decision.metadata.update({k: record[k] for k in ("version", "uri", "promoted")})
    metrics.log_metric("promoted", int(record["promoted"]))
    for side in ("candidate", "champion"):
        for key, value in (record["decision"][side] or {}).items():
            if math.isfinite(value):  # KFP wants numbers; a single-class split has no AUC
                metrics.log_metric(f"{side}_test_{key}", value)
    print(record["decision"]["summary"])
    seconds = time.perf_counter() - start
    storage.atomic_write_json(decision.path, {**record, "seconds": seconds})
    metrics.log_metric("seconds", round(seconds, 3))
    return outputs(record["version"], record["promoted"])
