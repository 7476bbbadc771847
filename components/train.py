"""``train``: CLR training of the configured network, between the LR range test's bounds."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._base import component


@component
def train(
    dataset: Input[Dataset],
    config: Input[Artifact],
    lr_finder: Input[Artifact],
    checkpoint_root: str,
    run_id: str,
    model: Output[Model],
    history: Output[Artifact],
    tensorboard: Output[Artifact],
    plots: Output[HTML],
    metrics: Output[Metrics],
    gpus: int = 0,
):
    """Train under a cyclical learning rate (cycleprune.training); model.keras in a folder.

    With a checkpoint_root, checkpoints live in <checkpoint_root>/<run_id>/train, so a retried
    attempt resumes from the last finished epoch (or the step a SIGTERM saved). `gpus` is the
    task's GPU request; training mirrors over every visible GPU (cycleprune.distribution).
    `seconds` in `history`: this stage's work after its imports (training, figures, artifacts).
    """
    import os
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from cycleprune import distribution, report, storage, training
    from cycleprune.config import Config

    start = time.perf_counter()
    distribution.check_gpus(gpus)
    cfg = Config.from_json(Path(config.path).read_text())
    bounds = storage.read_json(lr_finder.path)
    checkpoints = os.path.join(checkpoint_root, run_id, "train") if checkpoint_root else None
    with tempfile.TemporaryDirectory() as work:
        result = training.run_training(
            dataset.path,
            work,
            cfg,
            min_lr=bounds["min_lr"],
            max_lr=bounds["max_lr"],
            checkpoint_dir=checkpoints,
        )
        os.makedirs(model.path, exist_ok=True)
        shutil.copy2(result.model_path, os.path.join(model.path, "model.keras"))
        shutil.copytree(os.path.join(work, "tensorboard"), tensorboard.path, dirs_exist_ok=True)
        figures = report.training_figures(result.history, work, "train")
        notes = [f"TensorBoard logs: {tensorboard.uri}"]
        storage.atomic_write_text(plots.path, report.figures_html("Training", figures, notes=notes))

    model.metadata.update({"framework": "tf_keras", "file": "model.keras"})
    tensorboard.metadata.update({"run": "train", "logdir": tensorboard.uri})
    for key, value in sorted(result.val_metrics.items()):
        metrics.log_metric(f"val_{key}", value)
    metrics.log_metric("epochs", result.history["num_epochs"])
    seconds = time.perf_counter() - start
    record = {
        "history": result.history,
        "epochs_run": result.epochs_run,
        "val": result.val_metrics,
        "seconds": seconds,
    }
    storage.atomic_write_json(history.path, record)
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
