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
    """Validate the source and write TFRecord shards + dataset.json (cycleprune.data)."""
    import json
    import time

    from cycleprune import data, storage
    from cycleprune.config import Config

    config = Config.from_dict({"data": json.loads(data_config)}).data
    start = time.perf_counter()
    result = data.prepare_dataset(source, dataset.path, config)
    seconds = time.perf_counter() - start

    storage.atomic_write_json(info.path, {**result.to_dict(), "seconds": seconds})
    dataset.metadata.update(
        {"version": result.version, "classes": list(result.class_names), "source": source}
    )
    for split, counts in sorted(result.counts.items()):
        metrics.log_metric(f"{split}_examples", sum(counts.values()))
        for name, count in sorted(counts.items()):
            metrics.log_metric(f"{split}_{name}", count)
    metrics.log_metric("seconds", round(seconds, 3))
    # kfp.local's cache treats an output artifact without a file as missing (a cache miss), and
    # log_metric writes none: write the scalars so this cached stage really is served from cache.
    storage.atomic_write_json(metrics.path, metrics.metadata)
