"""``find_lr``: the LR range test; its bounds become the CLR bounds of training and pruning."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components._base import component


@component
def find_lr(
    dataset: Input[Dataset],
    config: Input[Artifact],
    lr_finder: Output[Artifact],
    plot: Output[HTML],
    metrics: Output[Metrics],
    checkpoint_root: str = "",
    run_id: str = "",
    gpus: int = 0,
):
    """LR range test (Smith 2017): exponential LR sweep, suggested CLR bounds.

    `lr_finder` (JSON) holds the curve, the suggestion and the bounds to use (`min_lr`,
    `max_lr`): the suggestion, unless the configuration sets schedule.min_lr/max_lr
    (`bounds_from` says which). With a checkpoint_root, the sweep checkpoints itself in
    <checkpoint_root>/<run_id>/find_lr, so a retry resumes it. `gpus` is the task's GPU request;
    the sweep mirrors over every visible GPU. `seconds` in `lr_finder`: this stage's work after
    its imports (the sweep, the figures, the artifacts).
    """
    import os
    import tempfile
    import time
    from pathlib import Path

    from cycleprune import distribution, report, storage
    from cycleprune import lr_finder as finder
    from cycleprune.config import Config

    start = time.perf_counter()
    distribution.check_gpus(gpus)
    cfg = Config.from_json(Path(config.path).read_text())
    checkpoints = os.path.join(checkpoint_root, run_id, "find_lr") if checkpoint_root else None
    with tempfile.TemporaryDirectory() as work:
        result = finder.run_lr_finder(dataset.path, work, cfg, checkpoint_dir=checkpoints)
        record = result.to_dict()
        page = report.figures_html("LR range test", report.lr_finder_figures(record, work))
        storage.atomic_write_text(plot.path, page)

    lr_finder.metadata.update({k: record[k] for k in ("min_lr", "max_lr", "bounds_from")})
    for key in ("min_lr", "max_lr", "suggested_min_lr", "suggested_max_lr", "steps"):
        if record[key] is not None:
            metrics.log_metric(key, record[key])
    seconds = time.perf_counter() - start
    storage.atomic_write_json(lr_finder.path, {**record, "seconds": seconds})
    metrics.log_metric("seconds", round(seconds, 3))
    # A Metrics artifact writes no file, and kfp.local's cache takes that for a lost output.
    storage.atomic_write_json(metrics.path, metrics.metadata)
