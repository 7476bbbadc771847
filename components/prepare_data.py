"""``prepare_data``: a source (``.npz``, image folder, prepared dataset) -> a prepared Dataset."""

from kfp.dsl import Artifact, Dataset, Metrics, Output

from components._base import component


@component
def prepare_data(
    source: str,
    data_config: str,
    dataset: Output[Dataset],
    info: Output[Artifact],
    metrics: Output[Metrics],
):
    """Validate the source and write TFRecord shards + dataset.json (cycleprune.data).

    `info` holds the DatasetInfo and `seconds`: this stage's work after its imports.
    """
    import json
    import time

    from cycleprune import data, storage
    from cycleprune.compat import tf  # noqa: F401 (TensorFlow loads before the clock starts)
    from cycleprune.config import Config

    start = time.perf_counter()
    config = Config.from_dict({"data": json.loads(data_config)}).data
    result = data.prepare_dataset(source, dataset.path, config)
    dataset.metadata.update(
        {"version": result.version, "classes": list(result.class_names), "source": source}
    )
    for split, counts in sorted(result.counts.items()):
        metrics.log_metric(f"{split}_examples", sum(counts.values()))
        for name, count in sorted(counts.items()):
            metrics.log_metric(f"{split}_{name}", count)
    seconds = time.perf_counter() - start
    storage.atomic_write_json(info.path, {**result.to_dict(), "seconds": seconds})
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
