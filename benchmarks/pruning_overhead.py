"""Section 3: training step time with tfmot's pruning wrappers against the dense model.

Both sides are the library's training path on the ``small`` preset model (width 0.25, BatchNorm,
batch 64, 28 x 28) with the same initial weights and data (augmentation off): **dense** is the
model :func:`cycleprune.training.fit` trains; **pruned** is the same model wrapped by
:func:`cycleprune.pruning.prune_model` and trained by ``training.fit`` with tfmot's
``UpdatePruningStep`` callback, as :func:`cycleprune.pruning.run_pruning` does; both at the
preset's ``train.steps_per_execution`` steps per call, as the two stages train. Each is
compiled and warmed up by one ``training.fit`` call, then each timed call is one epoch's
``model.fit`` (quick mode: 3 steps), interleaved, medians.

The pruning schedule is the preset's (polynomial, every ``frequency`` = 20 steps) with the ramp
stretched over the whole measurement (``end_epoch`` = every epoch it runs), so each timed step is
one of the ramp, where the masks are recomputed every 20 steps: the ramp is 3 of the 4
fine-tuning epochs of the ``small`` preset.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

from benchmarks import common
from benchmarks.common import Context, Target

BOUNDS = (1e-3, 1e-1)


def run(ctx: Context) -> dict[str, Any]:
    import tensorflow_model_optimization as tfmot

    from cycleprune import data, losses, models, pruning, schedules, training
    from cycleprune.config import preset

    prepared = common.prepared_dataset(ctx)
    config = preset("small")
    config = config.replace(data=dataclasses.replace(config.data, augment=False))
    info = data.load_info(prepared)
    batch = config.data.batch_size
    n_train = info.num_examples("train")
    epoch_steps = math.ceil(n_train / batch)
    steps = 3 if ctx.quick else epoch_steps
    images = n_train if steps == epoch_steps else steps * batch
    calls = 2 + ctx.repeats  # fit's warm-up, the interleaved warm-up, the repeats
    prune_config = dataclasses.replace(config.prune, begin_epoch=0, end_epoch=calls, epochs=calls)
    make = training.epoch_batches(
        prepared,
        config.data,
        batch_size=batch,
        class_weight=data.class_weights(info, config.data),
    )

    def batches(epoch: int) -> Any:
        return make(epoch) if steps == epoch_steps else make(epoch).take(steps)

    dense = models.build_model(config.model, info.image_shape, info.num_classes, seed=1)
    pruned = pruning.prune_model(dense, prune_config, steps_per_epoch=epoch_steps)

    def side(model: Any, name: str, callbacks: list) -> Callable[[], Any]:
        optimizer = schedules.make_optimizer(
            config.train,
            config.schedule,
            min_lr=BOUNDS[0],
            max_lr=BOUNDS[1],
            steps_per_epoch=epoch_steps,
        )
        training.fit(
            model,
            batches,
            None,
            optimizer=optimizer,
            loss=losses.make_loss(config.train),
            epochs=1,
            steps_per_epoch=steps,
            checkpoint_dir=ctx.work_dir / "pruning_overhead" / name,
            metrics=training.default_metrics(info.num_classes),
            extra_callbacks=callbacks,
            handle_sigterm=False,
            steps_per_execution=config.train.steps_per_execution,
        )
        epochs = itertools.count(1)
        return lambda: model.fit(batches(next(epochs)), epochs=1, callbacks=callbacks, verbose=0)

    sides = {
        "dense": side(dense, "dense", []),
        "pruned": side(pruned, "pruned", [tfmot.sparsity.keras.UpdatePruningStep()]),
    }
    timings = common.interleaved(sides, ctx.repeats, warmup=0 if ctx.quick else 1)
    for stats in timings.values():
        stats["images_per_s"] = images / stats["median_s"]
        stats["ms_per_step"] = stats["median_s"] / steps * 1000
    overhead = timings["pruned"]["median_s"] / timings["dense"]["median_s"]
    sparsity = pruning.overall_sparsity(pruned)
    target = Target(
        "pruning step-time overhead",
        overhead,
        1.3,
        op="<=",
        unit="x",
        note="pruned / dense step time, small preset, during the sparsity ramp",
    )
    return {
        "results": {
            "overhead_pruned_over_dense": overhead,
            "dense_ms_per_step": timings["dense"]["ms_per_step"],
            "pruned_ms_per_step": timings["pruned"]["ms_per_step"],
            "sparsity_at_end": sparsity,
            "steps_per_call": steps,
            "batch_size": batch,
            "images_per_call": images,
            "prune_config": dataclasses.asdict(prune_config),
            "sides": timings,
            "table": {
                "columns": ["model", "images/s", "ms/step", "median s per call"],
                "rows": [
                    [
                        name,
                        round(stats["images_per_s"], 1),
                        round(stats["ms_per_step"], 2),
                        round(stats["median_s"], 3),
                    ]
                    for name, stats in timings.items()
                ],
            },
        },
        "targets": [target.to_dict()],
        "skipped": None,
    }
