"""``compress``: export one model as Keras, SavedModel and TFLite (float32, dynamic, int8)."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components._base import component


@component
def compress(
    model: Input[Model],
    dataset: Input[Dataset],
    config: Input[Artifact],
    target_sparsity: float,
    models: Output[Model],
    metrics: Output[Metrics],
):
    """Export every configured format and measure raw and gzip sizes (cycleprune.compression).

    `models` is a folder: model.keras, saved_model/, model_<mode>.tflite and sizes.json. Every
    exported model takes raw uint8 pixels (rescaling is inside the model). `models`' metadata
    holds `seconds`: this stage's work after its imports.
    """
    import os
    import time
    from pathlib import Path

    from cycleprune import compression, storage
    from cycleprune.compat import tf  # noqa: F401 (TensorFlow loads before the clock starts)
    from cycleprune.config import Config
    from cycleprune.selection import variant_name

    start = time.perf_counter()
    cfg = Config.from_json(Path(config.path).read_text())
    sizes = compression.run_compression(
        os.path.join(model.path, "model.keras"), dataset.path, models.path, cfg
    )
    models.metadata.update(
        {
            "variant": variant_name(target_sparsity),
            "target_sparsity": target_sparsity,
            "sparsity": sizes["sparsity"],
            "formats": [m["format"] for m in sizes["models"]],
        }
    )
    for entry in sizes["models"]:
        metrics.log_metric(f"{entry['format']}_bytes", entry["size_bytes"])
        metrics.log_metric(f"{entry['format']}_gzip_bytes", entry["gzip_bytes"])
    metrics.log_metric("sparsity", sizes["sparsity"])
    seconds = time.perf_counter() - start
    models.metadata["seconds"] = seconds
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
