"""``prune``: magnitude pruning to one target sparsity, fine-tuned under the same CLR."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._base import component


@component
def prune(
    model: Input[Model],
    dataset: Input[Dataset],
    config: Input[Artifact],
    sparsity: float,
    lr_finder: Input[Artifact],
    checkpoint_root: str,
    run_id: str,
    pruned: Output[Model],
    history: Output[Artifact],
    tensorboard: Output[Artifact],
    plots: Output[HTML],
    metrics: Output[Metrics],
    gpus: int = 0,
):
    """Prune the trained model to `sparsity` with tfmot and fine-tune it (cycleprune.pruning).

    The saved model is stripped (plain Keras layers with zeroed weights). With a checkpoint_root,
    checkpoints live in <checkpoint_root>/<run_id>/<variant>, so a retry resumes. `gpus` is the
    task's GPU request; fine-tuning mirrors over every visible GPU. `seconds` in `history`: this
    stage's work after its imports (pruning, figures, artifacts).
    """
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from cycleprune import distribution, pruning, report, storage
    from cycleprune.config import Config
    from cycleprune.selection import variant_name

    start = time.perf_counter()
    distribution.check_gpus(gpus)
    cfg = Config.from_json(Path(config.path).read_text())
    bounds = storage.read_json(lr_finder.path)
    variant = variant_name(sparsity)
    checkpoints = os.path.join(checkpoint_root, run_id, variant) if checkpoint_root else None
    with tempfile.TemporaryDirectory() as work:
        result = pruning.run_pruning(
            os.path.join(model.path, "model.keras"),
            dataset.path,
            work,
            cfg,
            final_sparsity=sparsity,
            min_lr=bounds["min_lr"],
            max_lr=bounds["max_lr"],
            checkpoint_dir=checkpoints,
        )
        os.makedirs(pruned.path, exist_ok=True)
        shutil.copy2(result.model_path, os.path.join(pruned.path, "model.keras"))
        shutil.copytree(os.path.join(work, "tensorboard"), tensorboard.path, dirs_exist_ok=True)
        figures = report.pruning_figures(result.history, work, variant)
        notes = [*result.warnings, f"TensorBoard logs: {tensorboard.uri}"]
        page = report.figures_html(f"Pruning to {sparsity:.0%}", figures, notes=notes)
        storage.atomic_write_text(plots.path, page)

    labels = {"variant": variant, "target_sparsity": sparsity}
    pruned.metadata.update({**labels, "framework": "tf_keras", "file": "model.keras"})
    tensorboard.metadata.update({**labels, "run": variant, "logdir": tensorboard.uri})
    history.metadata.update(labels)
    metrics.log_metric("sparsity", result.sparsity)
    metrics.log_metric("target_sparsity", sparsity)
    seconds = time.perf_counter() - start
    record = {
        "history": result.history,
        "target_sparsity": sparsity,
        "sparsity": result.sparsity,
        "layer_sparsity": result.layer_sparsity,
        "best_checkpoint": result.best_checkpoint,
        "warnings": result.warnings,
        "seconds": seconds,
    }
    storage.atomic_write_json(history.path, record)
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
