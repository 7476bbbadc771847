"""``evaluate``: every exported model of one variant on the test split."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components._base import component


@component
def evaluate(
    models: Input[Model],
    dataset: Input[Dataset],
    config: Input[Artifact],
    target_sparsity: float,
    evaluation: Output[Artifact],
    classification: Output[ClassificationMetrics],
    plots: Output[HTML],
    metrics: Output[Metrics],
    gpus: int = 0,
):
    """Threshold on validation, metrics on test, latency (cycleprune.evaluation).

    `classification` holds the Keras model's test confusion matrix and ROC curve (drawn by the
    KFP UI); `metrics` the test scores of every format. `gpus` is the task's GPU request.
    `seconds` in `evaluation`: this stage's work after its imports (evaluation, figures,
    artifacts).
    """
    import math
    import tempfile
    import time
    from pathlib import Path

    from cycleprune import distribution, report, storage
    from cycleprune.config import Config
    from cycleprune.evaluation import run_evaluation
    from cycleprune.selection import variant_name

    start = time.perf_counter()
    distribution.check_gpus(gpus)
    cfg = Config.from_json(Path(config.path).read_text())
    variant = variant_name(target_sparsity)
    with tempfile.TemporaryDirectory() as work:
        result = run_evaluation(models.path, dataset.path, work, cfg)
        record = {**result, "target_sparsity": target_sparsity}
        figures = report.evaluation_figures(record, work, variant)
        figures += report.size_accuracy_figure(record["models"], work)
        page = report.figures_html(f"Evaluation: {variant}", figures)
        storage.atomic_write_text(plots.path, page)

    evaluation.metadata.update({"variant": variant, "target_sparsity": target_sparsity})
    keras_model = next(m for m in result["models"] if m["format"] == "keras")
    labels = report.binary_labels(result["class_names"], result["positive_class"])
    classification.log_confusion_matrix(labels, keras_model["test"]["confusion_matrix"])
    roc = keras_model["roc"]
    if roc["fpr"]:
        # scikit-learn's first threshold is +inf (stored as None): nothing is called positive.
        thresholds = [1.0 if t is None else min(float(t), 1.0) for t in roc["thresholds"]]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], thresholds)
    for entry in result["models"]:
        for key in ("accuracy", "sensitivity", "specificity", "auc"):
            value = entry["test"][key]  # AUC is None on a single-class split
            if value is not None and math.isfinite(float(value)):  # KFP wants numbers
                metrics.log_metric(f"{entry['format']}_test_{key}", float(value))
    seconds = time.perf_counter() - start
    storage.atomic_write_json(evaluation.path, {**record, "seconds": seconds})
    metrics.log_metric("seconds", round(seconds, 3))
    # Metrics artifacts write no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
    storage.atomic_write_json(classification.path, classification.metadata)
