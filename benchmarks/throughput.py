"""Section 1: training throughput (images/s) of cycleprune's CLR training against the article's.

Three implementations train the same model (same architecture, initial weights, batch size,
loss, metrics and training images) for the same number of steps per timed call:

- **a, cycleprune**: the library's path. :func:`cycleprune.training.fit` compiles the model
  (:func:`~cycleprune.schedules.make_optimizer`: SGD + momentum under the in-graph
  :class:`~cycleprune.schedules.CyclicalLearningRate`; the focal loss wrapped in
  :class:`~cycleprune.training.FiniteLoss`; :func:`~cycleprune.training.default_metrics`) and
  trains the warm-up epoch; each timed call is then the ``model.fit`` of one epoch that
  ``training.fit`` runs, on the batches of :func:`cycleprune.training.epoch_batches` (the
  ``tf.data`` pipeline of :func:`cycleprune.data.make_dataset`, class weights as sample
  weights). The per-epoch validation, checkpoint and JSON entry of ``training.fit`` are not
  timed: this is the training step.
- **b, article**: the article's approach, :class:`benchmarks.article_callback.CyclicLR`, a Python
  callback that reads and sets the LR after every batch, and ``model.fit`` on numpy arrays with
  ``class_weight=`` (as in the article); plain focal loss, same metrics.
- **c, plain**: ``model.fit`` with a constant LR (SGD + momentum, plain focal loss, same
  metrics), fed by the same ``tf.data`` pipeline as (a): a/c is the cost of the library's
  training step (in-graph schedule, NaN check) over the cheapest Keras step.

Augmentation is off on every side (the article's numpy feed has none to compare with); the
library's augmented pipeline is timed as an extra (``a_augment``), and (a) with
``jit_compile=True`` (XLA) as another (``a_jit``), both on the ``small`` preset only.

Models: the ``small`` preset (width 0.25, BatchNorm, batch 64, 28 x 28; one epoch of the 4,708
training images per timed call) and the article's full-width VGG (preset ``seed``: width 1.0,
no BatchNorm, batch 32; 10 steps per timed call). CLR bounds are the article's 1e-3..1e-1, with
the real half-cycle (``step_size_epochs`` x the real steps per epoch) on (a) and (b). Every
model gets one untimed warm-up fit (tracing), then the sides run interleaved (a b c a b c ...)
and the median of the repeats is reported.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import Context, Target

ARTICLE_BOUNDS = (1e-3, 1e-1)
FULL_WIDTH_STEPS = 10
DESCRIPTIONS = {
    "a": "cycleprune: training.fit path, in-graph CLR, tf.data",
    "b": "article: CyclicLR callback, numpy arrays",
    "c": "plain model.fit, constant LR, same tf.data",
    "a_jit": "(a) with jit_compile=True (XLA)",
    "a_augment": "(a) with the library's augmentation on",
}


def run(ctx: Context) -> dict[str, Any]:
    prepared = common.prepared_dataset(ctx)
    extras = ("a_jit",) if ctx.quick else ("a_jit", "a_augment")
    small = _compare(ctx, prepared, "small", steps=3 if ctx.quick else None, extras=extras)
    full = _compare(ctx, prepared, "seed", steps=2 if ctx.quick else FULL_WIDTH_STEPS, extras=())
    presets = {"small": small, "full_width": full}
    rows = []
    for label, result in presets.items():
        for side, stats in result["sides"].items():
            rows.append(
                [
                    label,
                    side,
                    DESCRIPTIONS[side],
                    round(stats["images_per_s"], 1),
                    round(stats["median_s"], 3),
                    f"{result['steps']} x {result['batch_size']}",
                ]
            )
    notes = {
        "a/c": "(c): constant LR, same tf.data pipeline; augmentation off",
        "a/b": "(b): article's CyclicLR callback on numpy arrays; augmentation off",
    }
    targets = []
    for label, result in presets.items():
        name = label.replace("_", " ")
        for pair in ("a/c", "a/b"):
            goal = 0.97 if pair == "a/c" else 1.05
            targets.append(
                Target(
                    f"throughput {pair} ({name})", result["ratios"][pair], goal, note=notes[pair]
                )
            )
    return {
        "results": {
            "a_over_b_small": small["ratios"]["a/b"],
            "a_over_c_small": small["ratios"]["a/c"],
            "a_over_b_full_width": full["ratios"]["a/b"],
            "a_over_c_full_width": full["ratios"]["a/c"],
            "jit_over_a_small": small["ratios"]["a_jit/a"],
            "augment_over_a_small": small["ratios"]["a_augment/a"],
            "epoch_startup_s_small": small["epoch_startup"]["median_s"],
            "epoch_startup_share_of_a_small": small["epoch_startup_share_of_a"],
            "epoch_startup_share_of_a_full_width": full["epoch_startup_share_of_a"],
            "presets": presets,
            "table": {
                "columns": ["model", "side", "implementation", "images/s", "median s", "steps"],
                "rows": rows,
            },
        },
        "targets": [t.to_dict() for t in targets],
        "skipped": None,
    }


def _compare(
    ctx: Context, prepared: Path, preset: str, *, steps: int | None, extras: tuple[str, ...]
) -> dict[str, Any]:
    """Time (a), (b), (c) and ``extras`` on one preset; ``steps=None`` is one whole epoch."""
    from cycleprune import data
    from cycleprune.config import preset as load_preset

    config = load_preset(preset)
    schedule = dataclasses.replace(
        config.schedule, min_lr=ARTICLE_BOUNDS[0], max_lr=ARTICLE_BOUNDS[1]
    )
    config = config.replace(data=dataclasses.replace(config.data, augment=False), schedule=schedule)
    info = data.load_info(prepared)
    batch = config.data.batch_size
    n_train = info.num_examples("train")
    epoch_steps = math.ceil(n_train / batch)
    steps = epoch_steps if steps is None else min(steps, epoch_steps)
    images = n_train if steps == epoch_steps else steps * batch
    setup = Setup(
        ctx,
        prepared,
        config,
        steps=steps,
        epoch_steps=epoch_steps,
        images=images,
        label=f"throughput-{preset}",
    )
    sides: dict[str, Callable[[], Any]] = {
        "a": setup.library(),
        "b": setup.article(),
        "c": setup.plain(),
    }
    if "a_jit" in extras:
        sides["a_jit"] = setup.library(jit=True)
    if "a_augment" in extras:
        sides["a_augment"] = setup.library(augment=True)
    # Every side was warmed up (traced) when it was built; one more untimed round in full mode.
    timings = common.interleaved(sides, ctx.repeats, warmup=0 if ctx.quick else 1)
    for stats in timings.values():
        stats["images_per_s"] = images / stats["median_s"]
    ips = {side: stats["images_per_s"] for side, stats in timings.items()}
    startup = setup.pipeline_startup(ctx.repeats)
    ratios = {
        "a/b": ips["a"] / ips["b"],
        "a/c": ips["a"] / ips["c"],
        "a_jit/a": common.ratio(ips.get("a_jit"), ips["a"]),
        "a_augment/a": common.ratio(ips.get("a_augment"), ips["a"]),
    }
    return {
        "preset": preset,
        "model": dataclasses.asdict(config.model),
        "batch_size": batch,
        "steps": steps,
        "images_per_call": images,
        "steps_per_epoch": epoch_steps,
        "min_lr": ARTICLE_BOUNDS[0],
        "max_lr": ARTICLE_BOUNDS[1],
        "sides": timings,
        "ratios": ratios,
        "epoch_startup": startup,
        "epoch_startup_share_of_a": startup["median_s"] / timings["a"]["median_s"],
    }


class Setup:
    """Builds each side's model and returns its timed call (after one untimed warm-up fit).

    Args:
        ctx: The benchmark context (checkpoints go to ``ctx.work_dir / label``).
        prepared: A prepared dataset.
        config: The run config (its data, model, schedule bounds and train settings are used).
        steps: Steps per timed call (``epoch_steps`` = one whole epoch).
        epoch_steps: Steps of a whole epoch (sets the CLR half-cycle).
        images: Images per timed call.
        label: Folder name for this setup's checkpoints.
    """

    def __init__(
        self,
        ctx: Context,
        prepared: Path,
        config: Any,
        *,
        steps: int,
        epoch_steps: int,
        images: int,
        label: str,
    ) -> None:
        from cycleprune import data, schedules

        self.ctx = ctx
        self.prepared = prepared
        self.config = config
        self.steps = steps
        self.epoch_steps = epoch_steps
        self.images = images
        self.label = label
        self.info = data.load_info(prepared)
        self.class_weight = data.class_weights(self.info, config.data)
        self.step_size = schedules.clr_step_size(epoch_steps, config.schedule.step_size_epochs)

    def _model(self) -> Any:
        from cycleprune import models

        return models.build_model(
            self.config.model,
            self.info.image_shape,
            self.info.num_classes,
            seed=self.config.train.seed,
        )

    def _metrics(self) -> list:
        from cycleprune import training

        return training.default_metrics(self.info.num_classes, self.config.evaluate.positive_class)

    def _batches(self, augment: bool = False) -> Callable[[int], Any]:
        from cycleprune import training

        settings = dataclasses.replace(self.config.data, augment=augment)
        make = training.epoch_batches(
            self.prepared,
            settings,
            batch_size=settings.batch_size,
            class_weight=self.class_weight,
        )
        if self.steps == self.epoch_steps:
            return make
        return lambda epoch: make(epoch).take(self.steps)

    def library(self, *, jit: bool = False, augment: bool = False) -> Callable[[], Any]:
        from cycleprune import losses, schedules, training

        model = self._model()
        optimizer = schedules.make_optimizer(
            self.config.train,
            self.config.schedule,
            min_lr=self.config.schedule.min_lr,
            max_lr=self.config.schedule.max_lr,
            steps_per_epoch=self.epoch_steps,
        )
        batches = self._batches(augment)
        name = f"a{'-jit' if jit else ''}{'-augment' if augment else ''}"
        training.fit(
            model,
            batches,
            None,
            optimizer=optimizer,
            loss=losses.make_loss(self.config.train),
            epochs=1,
            steps_per_epoch=self.steps,
            checkpoint_dir=self.ctx.work_dir / self.label / name,
            metrics=self._metrics(),
            handle_sigterm=False,
        )
        epochs = itertools.count(1)

        def fit() -> Any:
            return model.fit(batches(next(epochs)), epochs=1, verbose=0)

        if jit:
            model.jit_compile = True  # resets the compiled train function
            fit()  # warm-up: XLA compilation
        return fit

    def article(self, *, jit: bool = False) -> Callable[[], Any]:
        from benchmarks.article_callback import CyclicLR
        from cycleprune import data, losses
        from cycleprune.compat import keras

        images, labels = data.load_arrays(self.prepared, "train")
        x = images.astype(np.float32)
        y = np.eye(self.info.num_classes, dtype=np.float32)[labels]
        # All the training arrays, as the article feeds them; a part of an epoch is
        # `steps_per_epoch`, so that each call pays the numpy feed's per-epoch setup like (a).
        steps = None if self.steps == self.epoch_steps else self.steps
        model = self._model()
        low, high = self.config.schedule.min_lr, self.config.schedule.max_lr
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=low, momentum=self.config.train.momentum),
            loss=losses.make_loss(self.config.train),
            metrics=self._metrics(),
            jit_compile=jit,
        )
        clr = CyclicLR(
            base_lr=low, max_lr=high, step_size=self.step_size, mode=self.config.schedule.policy
        )
        batch = self.config.data.batch_size

        def fit() -> Any:
            return model.fit(
                x,
                y,
                batch_size=batch,
                epochs=1,
                steps_per_epoch=steps,
                class_weight=self.class_weight,
                callbacks=[clr],
                verbose=0,
            )

        fit()  # warm-up: tracing
        return fit

    def plain(self, *, jit: bool = False) -> Callable[[], Any]:
        from cycleprune import losses
        from cycleprune.compat import keras

        model = self._model()
        model.compile(
            optimizer=keras.optimizers.SGD(
                learning_rate=self.config.schedule.min_lr, momentum=self.config.train.momentum
            ),
            loss=losses.make_loss(self.config.train),
            metrics=self._metrics(),
            jit_compile=jit,
        )
        batches = self._batches()
        epochs = itertools.count()

        def fit() -> Any:
            return model.fit(batches(next(epochs)), epochs=1, verbose=0)

        fit()  # warm-up: tracing
        return fit

    def pipeline_startup(self, repeats: int) -> dict[str, Any]:
        """Seconds from building an epoch's batches (``epoch_batches``) to its first batch.

        Paid once per epoch by (a) and (c), before the first step: the pipeline is rebuilt for
        every epoch, and the shuffle buffer (the whole split) fills before a batch comes out.
        """
        make = self._batches()
        samples = []
        for epoch in range(1000, 1000 + repeats):
            start = time.perf_counter()
            next(iter(make(epoch)))
            samples.append(time.perf_counter() - start)
        return common.summarize(samples)
