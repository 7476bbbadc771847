"""``report``: the run folder (summary.json, report.html, models, TensorBoard logs)."""

from kfp.dsl import HTML, Artifact, Input, Model, Output

from components._base import component


@component
def report(
    config: Input[Artifact],
    dataset_info: Input[Artifact],
    lr_finder: Input[Artifact],
    train_history: Input[Artifact],
    train_tensorboard: Input[Artifact],
    prune_histories: Input[list[Artifact]],
    prune_tensorboards: Input[list[Artifact]],
    dense_evaluation: Input[Artifact],
    pruned_evaluations: Input[list[Artifact]],
    dense_models: Input[Model],
    pruned_models: Input[list[Model]],
    selection: Input[Artifact],
    push_decision: Input[Artifact],
    run: Output[Artifact],
    html: Output[HTML],
):
    """Assemble the run folder and its self-contained HTML report (cycleprune.report).

    `run` holds summary.json, report.html, models/<variant>/ and tensorboard/<run>/; `html` is
    the same report for the KFP UI. summary.json's `seconds` gets this stage's own last
    (cycleprune.report.add_stage_seconds): its work after its imports.
    """
    import shutil
    import time
    from pathlib import Path

    from cycleprune import report as run_report
    from cycleprune.config import Config

    start = time.perf_counter()
    models = [dense_models, *pruned_models]
    stages = run_report.StageOutputs(
        dataset=dataset_info.path,
        lr_finder=lr_finder.path,
        training=train_history.path,
        pruning=[a.path for a in prune_histories],
        evaluations=[a.path for a in [dense_evaluation, *pruned_evaluations]],
        models={m.metadata["variant"]: m.path for m in models},
        tensorboard={
            "train": train_tensorboard.path,
            **{a.metadata["variant"]: a.path for a in prune_tensorboards},
        },
        selection=selection.path,
        compress_seconds={m.metadata["variant"]: m.metadata["seconds"] for m in models},
        push=push_decision.path,
        configure_seconds=config.metadata.get("seconds"),
    )
    run_report.build_run(run.path, stages, Config.from_json(Path(config.path).read_text()))
    shutil.copy2(f"{run.path}/report.html", html.path)
    summary = run_report.add_stage_seconds(run.path, "report", time.perf_counter() - start)
    run.metadata.update({"selected": summary["selected"], "seconds": summary["seconds"]["total"]})
    if summary["registry"]:
        run.metadata.update({k: summary["registry"][k] for k in ("version", "promoted")})
