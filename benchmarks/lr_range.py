"""Section 2: the LR range test: what it costs, and how good its suggested CLR bounds are.

The library's range test (:func:`cycleprune.lr_finder.run_lr_finder`, automatic bounds:
``schedule.min_lr = max_lr = 0``) on the ``small`` preset runs ``lr_finder.num_steps`` optimizer
steps, whatever the dataset size. The article swept the learning rate over 5 whole epochs
(``5 * steps_per_epoch`` steps). This section measures the test's cost in steps, epochs and
seconds against that sweep (its seconds: 5 x the measured steady-state seconds of a training
epoch). Then, for each of 8 seeds, it sweeps (the seed sets the initial weights and the data
order, so the suggestion differs per seed, as it does in the pipeline), trains a short CLR run
(one cycle: 4 epochs with ``step_size_epochs=2``) with that seed's suggested bounds, and the same
run with the article's hand-picked 1e-3..1e-1, and compares the mean validation accuracy and AUC.
Eight seeds, because one 4-epoch run's validation accuracy at the 0.5 cut-off moves by 32 points
between seeds, and by up to 44 between nearly equal bounds (``benchmarks/results/ablation.md``, R).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import Context, Target

ARTICLE_BOUNDS = (1e-3, 1e-1)
ARTICLE_SWEEP_EPOCHS = 5
# One CLR cycle of the small preset (step_size_epochs=2): the quickest run that ends at min_lr.
TRAIN_EPOCHS = 4
FULL_SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)
QUICK_SEEDS = (1,)


def bench_config(quick: bool):
    """The ``small`` preset (quick: ``smoke``) on the bundled data, automatic LR bounds."""
    from cycleprune.cli import BUNDLED_CLASS_NAMES
    from cycleprune.config import preset

    config = preset("smoke" if quick else "small")
    data = dataclasses.replace(config.data, class_names=BUNDLED_CLASS_NAMES)
    train = config.train if quick else dataclasses.replace(config.train, epochs=TRAIN_EPOCHS)
    return config.replace(data=data, train=train)


def seeded(config, seed: int):
    """The same run with another weight-initialisation and data-order seed."""
    return config.replace(
        data=dataclasses.replace(config.data, seed=seed),
        train=dataclasses.replace(config.train, seed=seed),
    )


def sweep_cost(steps: int, steps_per_epoch: int, sweep_epochs: int = ARTICLE_SWEEP_EPOCHS):
    """The range test's steps in epochs, and the article's sweep (``sweep_epochs`` epochs) in
    steps."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1. Received: {steps_per_epoch=}")
    return {
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "article_steps": sweep_epochs * steps_per_epoch,
        "article_epochs": sweep_epochs,
        "steps_ratio_article_over_test": sweep_epochs * steps_per_epoch / steps if steps else None,
    }


class _EpochClock(logging.Handler):
    """Timestamps of ``cycleprune.training``'s end-of-epoch log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stamps: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("epoch %d step"):
            self.stamps.append(time.perf_counter())


@contextlib.contextmanager
def _epoch_clock() -> Iterator[_EpochClock]:
    logger = logging.getLogger("cycleprune.training")
    clock = _EpochClock()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the INFO lines are for the clock, not for the console
    try:
        yield clock
    finally:
        logger.removeHandler(clock)
        logger.setLevel(level)
        logger.propagate = propagate


def _train(dataset: Path, out: Path, config, bounds: tuple[float, float]) -> dict[str, Any]:
    from cycleprune import training

    start = time.perf_counter()
    try:
        with _epoch_clock() as clock:
            result = training.run_training(dataset, out, config, min_lr=bounds[0], max_lr=bounds[1])
    except training.DivergenceError as err:
        return {"diverged": str(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    epochs = [b - a for a, b in zip([start, *clock.stamps], clock.stamps, strict=False)]
    return {
        "min_lr": result.min_lr,
        "max_lr": result.max_lr,
        "val_accuracy": float(result.val_metrics["accuracy"]),
        "val_auc": float(result.val_metrics["auc"]),
        "epochs": result.history["num_epochs"],
        "steps_per_epoch": result.history["steps_per_epoch"],
        "seconds": seconds,
        "epoch_seconds": [round(s, 3) for s in epochs],
    }


def range_test_failures(sweeps: list[dict], suggested: list[dict]) -> str:
    """Why the accuracy target fails whatever the means say, or ``""``.

    A seed whose range test suggested nothing, or whose suggested bounds diverged, is a failure
    of the range test, not a seed to leave out of the comparison.
    """
    failures = [f"seed {s['seed']}: no suggestion" for s in sweeps if "max_lr" not in s]
    failures += [f"seed {r['seed']}: diverged" for r in suggested if "diverged" in r]
    return "; ".join(failures)


def _span(sweeps: list[dict], key: str) -> str:
    """``"a..b"`` (or ``"a"``) of the suggested bound ``key`` over the seeds' sweeps."""
    values = sorted(s[key] for s in sweeps)
    if not values:
        return ""
    if values[0] == values[-1]:
        return f"{values[0]:.3g}"
    return f"{values[0]:.3g}..{values[-1]:.3g}"


def _mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.fmean(values) if values and len(values) == len(runs) else None


def run(ctx: Context) -> dict[str, Any]:
    from cycleprune import data, distribution, lr_finder

    config = bench_config(ctx.quick)
    work = ctx.work_dir / "lr_range"
    dataset = work / "dataset"
    data.prepare_dataset(str(ctx.source), dataset, config.data)
    info = data.load_info(dataset)
    global_batch = distribution.global_batch_size(
        config.data.batch_size, distribution.select_strategy()
    )
    steps_per_epoch = math.ceil(info.num_examples("train") / global_batch)

    # Every seed sweeps with its own weights and data order, as the pipeline does, and trains
    # with its own suggestion; the article's bounds train the same seeds.
    seeds = QUICK_SEEDS if ctx.quick else FULL_SEEDS
    runs: dict[str, list[dict]] = {"suggested": [], "article": []}
    sweeps: list[dict[str, Any]] = []
    errors: list[str] = []
    for seed in seeds:
        seeded_config = seeded(config, seed)
        start = time.perf_counter()
        try:
            found = lr_finder.run_lr_finder(dataset, work / f"lr_finder-{seed}", seeded_config)
        except lr_finder.LRFinderError as err:
            found = None
            errors.append(f"seed {seed}: {err}")
        seconds = time.perf_counter() - start
        sweeps.append(
            {"seed": seed, "seconds": seconds}
            if found is None
            else {
                "seed": seed,
                "seconds": seconds,
                "min_lr": found.min_lr,
                "max_lr": found.max_lr,
                "steps": found.steps,
                "stopped_early": found.stopped_early,
                "bounds_from": found.bounds_from,
            }
        )
        sides = {"article": ARTICLE_BOUNDS}
        if found is not None:
            sides = {"suggested": (found.min_lr, found.max_lr), **sides}
        for name, bounds in sides.items():  # interleaved: suggested, article, suggested, ...
            out = work / f"train-{name}-{seed}"
            runs[name].append({"seed": seed, **_train(dataset, out, seeded_config, bounds)})
    suggestion_error = "; ".join(errors)
    found_all = [s for s in sweeps if "max_lr" in s]
    finder_seconds = statistics.median(s["seconds"] for s in sweeps)

    # Steady-state seconds of a training epoch: every epoch but each run's first (tracing).
    steady = [s for side in runs.values() for r in side for s in r.get("epoch_seconds", [])[1:]]
    epoch_seconds = statistics.median(steady) if steady else None
    # The most steps any seed's sweep took (a sweep that diverges stops early).
    steps = max((s["steps"] for s in found_all), default=config.lr_finder.num_steps)
    cost = sweep_cost(steps, steps_per_epoch)
    article_seconds = ARTICLE_SWEEP_EPOCHS * epoch_seconds if epoch_seconds else None
    cost.update(
        seconds=finder_seconds,
        article_seconds_estimate=article_seconds,
        epoch_seconds=epoch_seconds,
        seconds_in_epochs=finder_seconds / epoch_seconds if epoch_seconds else None,
    )

    # Means over the seeds that trained both sides (a seed whose sweep gave no suggestion is
    # named in the cost note, and trained the article's bounds only).
    metrics = ("val_accuracy", "val_auc")
    paired = {r["seed"] for r in runs["suggested"]}
    compared = {name: [r for r in side if r["seed"] in paired] for name, side in runs.items()}
    means = {name: {k: _mean(r, k) for k in metrics} for name, r in compared.items()}
    diff_acc = diff_auc = None
    if paired and None not in (*means["suggested"].values(), *means["article"].values()):
        diff_acc = 100 * (means["suggested"]["val_accuracy"] - means["article"]["val_accuracy"])
        diff_auc = 100 * (means["suggested"]["val_auc"] - means["article"]["val_auc"])

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    suggested = means.get("suggested", {"val_accuracy": None, "val_auc": None})
    label = f"{config.train.epochs}-epoch CLR, mean of {len(paired)} seed(s)"
    rows = [
        ["cost (optimizer steps)", cost["steps"], cost["article_steps"]],
        ["cost (epochs)", fmt(cost["epochs"], ".2f"), ARTICLE_SWEEP_EPOCHS],
        [
            "cost (seconds; article = 5 x epoch)",
            fmt(finder_seconds, ".1f"),
            fmt(article_seconds, ".1f"),
        ],
        ["min_lr (per seed)", _span(found_all, "min_lr"), f"{ARTICLE_BOUNDS[0]:g}"],
        ["max_lr (per seed)", _span(found_all, "max_lr"), f"{ARTICLE_BOUNDS[1]:g}"],
        [
            f"val accuracy ({label})",
            fmt(suggested["val_accuracy"], ".4f"),
            fmt(means["article"]["val_accuracy"], ".4f"),
        ],
        [
            f"val AUC ({label})",
            fmt(suggested["val_auc"], ".4f"),
            fmt(means["article"]["val_auc"], ".4f"),
        ],
    ]
    preset_name = "smoke" if ctx.quick else "small"
    cost_note = (
        f"{steps} sweep steps / {steps_per_epoch} steps per epoch (batch {global_batch}, "
        f"{info.num_examples('train')} train images); the article swept 5 epochs "
        f"({cost['article_steps']} steps). lr_finder.num_steps={config.lr_finder.num_steps} "
        f"comes from the {preset_name} preset (cycleprune/config.py)."
    )
    if epoch_seconds:
        cost_note += (
            f" In seconds: {finder_seconds:.1f} s per range test (median; model build and "
            f"tracing included) = {finder_seconds / epoch_seconds:.2f} x a steady training "
            f"epoch of {epoch_seconds:.1f} s (validation and checkpoint included, tracing not)."
        )
    if errors:
        cost_note += f" The range test gave no suggestion for {suggestion_error}"
    acc_note = "validation accuracy in points (100 x), suggested minus article bounds"
    if diff_auc is not None:
        acc_note += f"; AUC difference {diff_auc:+.2f} points"
    acc_note += f"; {len(paired)} of {len(seeds)} seed(s), {label.split(',')[0]}"
    diverged = [f"{n}/{r['seed']}" for n, side in runs.items() for r in side if "diverged" in r]
    if diverged:
        acc_note += f"; diverged: {', '.join(diverged)}"
    return {
        "results": {
            "preset": preset_name,
            "steps_per_epoch": steps_per_epoch,
            "global_batch": global_batch,
            "cost": cost,
            "lr_finder": sweeps,
            "suggestion_error": suggestion_error or None,
            "article_bounds": list(ARTICLE_BOUNDS),
            "runs": runs,
            "means": means,
            "val_accuracy_diff_points": diff_acc,
            "val_auc_diff_points": diff_auc,
            "table": {"columns": ["", "LR range test", "article"], "rows": rows},
        },
        "targets": [
            Target(
                "LR range test cost (epochs)", cost["epochs"], 1.0, "<=", note=cost_note
            ).to_dict(),
            Target(
                "val accuracy: suggested bounds - article bounds",
                diff_acc,
                0.0,
                ">=",
                unit=" pts",
                note=acc_note,
                failed=range_test_failures(sweeps, runs["suggested"]),
            ).to_dict(),
        ],
        "skipped": None,
    }
