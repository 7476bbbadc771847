"""Section 1: training throughput (images/s) of cycleprune's CLR training against the article's.

Three implementations train the same model (same architecture, initial weights, batch size,
loss, metrics and training images) for the same number of steps per timed call:

- **a, cycleprune**: the library's path. :func:`cycleprune.training.fit` compiles the model
  (:func:`~cycleprune.schedules.make_optimizer`: SGD + momentum under the in-graph
  :class:`~cycleprune.schedules.CyclicalLearningRate`; the preset's loss from
  :func:`cycleprune.losses.make_loss` wrapped in :class:`~cycleprune.training.FiniteLoss`;
  :func:`~cycleprune.training.default_metrics`) and
  trains the warm-up epoch; each timed call is then the ``model.fit`` of one epoch that
  ``training.fit`` runs, on the batches of :func:`cycleprune.training.epoch_batches` (the
  ``tf.data`` pipeline of :func:`cycleprune.data.make_dataset`, class weights as sample
  weights). The per-epoch validation, checkpoint and JSON entry of ``training.fit`` are not
  timed: this is the training step.
- **b, article**: the article's approach, :class:`benchmarks.article_callback.CyclicLR`, a Python
  callback that reads and sets the LR after every batch, and ``model.fit`` on numpy arrays with
  ``class_weight=`` (as in the article); the same loss, not wrapped, same metrics.
- **b_nocb, article without its callback**: (b) as it is, without ``CyclicLR`` (a constant
  LR): b_nocb/b is the whole per-batch cost of the article's callback (its hook, and what
  Keras does each batch for a callback that reads the logs), and a/b_nocb the rest of a/b
  (the feed, and the 16-step loop that (b) cannot use). The two sides train at different LRs,
  so they compute on different numbers; the bench does not separate that from the callback.
  On 2026-12-05, (b_nocb) was even a little slower than (b) at full width (b_nocb/b 0.977).
- **c, plain**: ``model.fit`` with a constant LR (SGD + momentum, the same loss not wrapped,
  same metrics), fed by the same ``tf.data`` pipeline as (a): a/c is the cost of the library's
  training step (in-graph schedule, NaN check) over the cheapest Keras step.

Every side weights the images by class (the preset's class weights: sample weights in the
pipeline of (a) and (c), ``class_weight=`` for (b)), gets float32 images 0..255 and one-hot
labels, and builds its own model from the same seed (same initial weights).

Augmentation is off on every side (the article's numpy feed has none to compare with); the
library's augmented pipeline is timed as an extra (``a_augment``), (a) with
``jit_compile=True`` (XLA) as another (``a_jit``), and (a) with one step per call of the train
function (``a_spe1``), all on the ``small`` preset only.

Steps per call: (a) and (c) run the preset's ``train.steps_per_execution`` steps per call of
Keras' compiled train function (a loop in the graph, no Python between the steps; the in-graph
schedule still moves every step), as the library trains. (b) cannot: its callback must run
after every batch, which is one call per step. ``a/a_spe1`` is what the loop gains.

Models: the ``small`` preset (width 0.25, BatchNorm, batch 64, 28 x 28; one epoch of the 4,708
training images per timed call) and the article's full-width VGG (preset ``seed``: width 1.0,
no BatchNorm, batch 32; :data:`FULL_WIDTH_STEPS` steps per timed call). CLR bounds are the
article's 1e-3..1e-1, with the real half-cycle (``step_size_epochs`` x the real steps per epoch)
on (a) and (b).

Method:

- **What is timed.** A timed call is one ``model.fit``, from the call to its ``on_train_end``
  (a callback with no per-batch hook, given to every side): everything of the fit up to the
  last step, metrics read back, but not the teardown after ``on_train_end``. Destroying a
  ``tf.data`` iterator (every fit ends by dropping one, on every side: the numpy feed of (b) is
  a ``tf.data`` pipeline inside Keras too) may block until the next tick of tf.data's autotuning
  thread, whose period doubles from 10 ms (ticks at ~0.31, 0.63, 1.27, 2.55, 5.11 s after the
  iterator was made), so a fit of 1.9 s or 2.4 s sometimes returned at 2.58 s or 5.15 s: about
  half the calls of the 2026-12-04 runs, at random, which made the medians and their ratios
  jump between runs. The wall time of each call is still recorded (``wall_samples_s``) and the
  difference reported per side as ``teardown_*``. Since then the library's pipelines run with
  autotuning off (:func:`cycleprune.data.pipeline_options`), so (a) and (c), which use them,
  no longer wait; (b)'s numpy feed, built by Keras, still does (up to 2 s per call). The article
  pays that once per training (one ``fit`` for all epochs), the library would pay it once per
  epoch, which is why its pipelines turn autotuning off.
- **Paired rounds.** After one untimed warm-up fit per model (tracing) and, in full mode, one
  untimed round, the sides run in :data:`FULL_ROUNDS` rounds (``ctx.repeats`` in quick mode),
  each side once per round, in the order b_nocb b a c (extras) and reversed every other round
  (:func:`benchmarks.common.paired_rounds`); ``gc.collect()`` runs untimed after every call.
- **Ratios.** Each ratio (images/s of one side over another's, same images per call) is the
  median of the per-round ratios of the two sides' calls of the same round, timed back to back
  (:func:`benchmarks.common.paired_ratio`), which cancels a drift of the machine over the run;
  the quartiles and the range of the per-round ratios are in the results and the target's
  note, and each side's median images/s is kept, with the old ratio of medians beside.
- **The callback's cost.** Measured two ways. b_nocb/b (paired, as every ratio) is what
  taking the callback out of (b) gains. And (b)'s callback times its own per-batch hook
  (:func:`timed_cyclic_lr`: read the LR, compute the next, write it, keep the history) in
  every timed call; ``article_callback`` holds the median call's hook time per step and its
  share of (b)'s median step. The hook is only part of the cost: Keras also turns the batch's
  logs into Python numbers for such a callback, outside the hook.
- **Threads.** TensorFlow's thread pools are left at their defaults (one thread per usable
  core); they are process-wide, so every side shares them. ``benchmarks.run`` records the
  setting in the machine record.

Durations (full mode, 2 cores): with (b_nocb), a round has 7 sides on ``small`` and 4 on the
full width (each full-width call 20 steps of ~0.23 s, ending before the 5.1 s tick); with the
untimed round and the setup, the section took 522 s on 2026-12-05 (about 5.5 minutes before
(b_nocb) was added). ``FULL_WIDTH_STEPS`` is chosen so that a call ends well between
two ticks: 16 steps (~3.1 s) would wait for the 5.1 s tick about half the time, and over ~5 s
the next tick is at 10.2 s.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import Context, Target

ARTICLE_BOUNDS = (1e-3, 1e-1)
FULL_WIDTH_STEPS = 20
FULL_ROUNDS = 8  # paired rounds in full mode (at least ctx.repeats; made even)
# Round order (reversed every other round): each side next to the ones it is compared with.
ORDER = ("b_nocb", "b", "a", "c")
DESCRIPTIONS = {
    "a": "cycleprune: training.fit path, in-graph CLR, tf.data",
    "b": "article: CyclicLR callback, numpy arrays",
    "b_nocb": "(b) without its callback (constant LR)",
    "c": "plain model.fit, constant LR, same tf.data",
    "a_jit": "(a) with jit_compile=True (XLA)",
    "a_augment": "(a) with the library's augmentation on",
    "a_spe1": "(a) with Python between every step (steps_per_execution=1)",
}


def run(ctx: Context) -> dict[str, Any]:
    prepared = common.prepared_dataset(ctx)
    extras = ("a_spe1", "a_jit") if ctx.quick else ("a_spe1", "a_jit", "a_augment")
    small = _compare(ctx, prepared, "small", steps=3 if ctx.quick else None, extras=extras)
    full = _compare(ctx, prepared, "seed", steps=2 if ctx.quick else FULL_WIDTH_STEPS, extras=())
    return assemble({"small": small, "full_width": full})


def assemble(presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The section record from each preset's :func:`_compare` (``small``, ``full_width``)."""
    small, full = presets["small"], presets["full_width"]
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
                    round(stats["teardown_median_s"], 3),
                    round(stats["teardown_max_s"], 3),
                    f"{result['steps']} x {result['batch_size']}",
                ]
            )
    notes = {
        "a/c": "(c): constant LR, same tf.data pipeline; augmentation off",
        "a/b": "(b): article's CyclicLR callback on numpy arrays; augmentation off",
    }
    targets = []
    ratio_rows = []
    for label, result in presets.items():
        name = label.replace("_", " ")
        for pair in ("a/c", "a/b"):
            goal = 0.97 if pair == "a/c" else 1.05
            paired = result["paired"][pair]
            note = f"{spread(paired)}; {notes[pair]}"
            without = result["paired"].get("b_nocb/b")
            if pair == "a/b" and without is not None:
                note += (
                    f"; without its callback (b) is {without['median']:.3f}x as fast "
                    f"(IQR {without['q1']:.3f}-{without['q3']:.3f}), "
                    f"a/b_nocb {result['ratios']['a/b_nocb']:.3f}"
                )
            callback = result.get("article_callback")
            if pair == "a/b" and callback:
                note += (
                    f"; the callback's hook takes {callback['hook_ms_per_step']:.2f} ms of (b)'s "
                    f"{callback['b_ms_per_step']:.1f} ms step ({callback['share_of_b_step']:.2%})"
                )
            targets.append(Target(f"throughput {pair} ({name})", paired["median"], goal, note=note))
        for pair, paired in result["paired"].items():
            if paired is not None:
                ratio_rows.append(
                    [
                        label,
                        pair,
                        round(paired["median"], 4),
                        f"{paired['q1']:.4f} - {paired['q3']:.4f}",
                        f"{paired['min']:.4f} - {paired['max']:.4f}",
                        paired["n"],
                        round(paired["ratio_of_medians"], 4),
                    ]
                )
    callback_rows = [
        [
            label,
            round(callback["hook_ms_per_step"], 3),
            round(callback["b_ms_per_step"], 2),
            f"{callback['share_of_b_step']:.2%}",
            _round(result["ratios"].get("b_nocb/b")),
            _round(result["ratios"].get("a/b_nocb")),
            callback["calls"],
        ]
        for label, result in presets.items()
        if (callback := result.get("article_callback"))
    ]
    tables = {
        "paired ratios (images/s over images/s, per round)": {
            "columns": [
                "model",
                "ratio",
                "median",
                "IQR",
                "min - max",
                "rounds",
                "ratio of medians",
            ],
            "rows": ratio_rows,
        }
    }
    if callback_rows:
        tables["the article's callback: its per-batch hook's host time, and (b) without it"] = {
            "columns": [
                "model",
                "hook ms per step (median call)",
                "(b) ms per step (median)",
                "hook share",
                "b_nocb/b",
                "a/b_nocb",
                "timed calls",
            ],
            "rows": callback_rows,
        }
    return {
        "results": {
            "a_over_b_small": small["ratios"]["a/b"],
            "a_over_c_small": small["ratios"]["a/c"],
            "a_over_b_full_width": full["ratios"]["a/b"],
            "a_over_c_full_width": full["ratios"]["a/c"],
            "jit_over_a_small": small["ratios"]["a_jit/a"],
            "a_over_spe1_small": small["ratios"]["a/a_spe1"],
            "augment_over_a_small": small["ratios"]["a_augment/a"],
            "nocb_over_b_small": small["ratios"]["b_nocb/b"],
            "nocb_over_b_full_width": full["ratios"]["b_nocb/b"],
            "rounds": small["rounds"],
            "epoch_startup_s_small": small["epoch_startup"]["median_s"],
            "epoch_startup_share_of_a_small": small["epoch_startup_share_of_a"],
            "epoch_startup_share_of_a_full_width": full["epoch_startup_share_of_a"],
            "presets": presets,
            "table": {
                "columns": [
                    "model",
                    "side",
                    "implementation",
                    "images/s",
                    "median s",
                    "teardown median s",
                    "teardown max s",
                    "steps",
                ],
                "rows": rows,
            },
            "tables": tables,
        },
        "targets": [t.to_dict() for t in targets],
        "skipped": None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def spread(paired: dict[str, Any]) -> str:
    """``paired_ratio``'s spread in words, for a target's note."""
    return (
        f"median of {paired['n']} per-round ratios, IQR {paired['q1']:.3f}-{paired['q3']:.3f}, "
        f"range {paired['min']:.3f}-{paired['max']:.3f}"
    )


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
    built: dict[str, Callable[[], Any]] = {
        "a": setup.library(),
        "b": setup.article(),
        "c": setup.plain(),
        "b_nocb": setup.article(callback=False),
    }
    if "a_spe1" in extras:
        built["a_spe1"] = setup.library(steps_per_execution=1)
    if "a_jit" in extras:
        built["a_jit"] = setup.library(jit=True)
    if "a_augment" in extras:
        built["a_augment"] = setup.library(augment=True)
    sides = {name: built[name] for name in (*ORDER, *extras)}
    rounds = ctx.repeats if ctx.quick else max(ctx.repeats, FULL_ROUNDS)
    rounds += rounds % 2  # even: every side as often in each position
    # Every side was warmed up (traced) when it was built; one more untimed round in full mode.
    timings = common.paired_rounds(sides, rounds, warmup=0 if ctx.quick else 1, between=gc.collect)
    timings = {name: timings[name] for name in built}  # a, b, c, b_nocb, extras in the tables
    return compare_timings(
        timings,
        images=images,
        startup=setup.pipeline_startup(ctx.repeats),
        callback=setup.callback_time(rounds),
        info={
            "preset": preset,
            "model": dataclasses.asdict(config.model),
            "batch_size": batch,
            "steps": steps,
            "images_per_call": images,
            "steps_per_epoch": epoch_steps,
            "min_lr": ARTICLE_BOUNDS[0],
            "max_lr": ARTICLE_BOUNDS[1],
            "rounds": rounds,
            "order": [*ORDER, *extras],
        },
    )


def compare_timings(
    timings: dict[str, dict[str, Any]],
    *,
    images: int,
    startup: dict[str, Any],
    info: dict[str, Any],
    callback: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """One preset's result from :func:`benchmarks.common.paired_rounds`' timings of its sides.

    Adds ``images_per_s`` (of the median) and the teardown left out of each sample (wall time
    minus recorded time: median, max) to every side; ``paired`` holds
    :func:`benchmarks.common.paired_ratio` of each ratio (``None`` when a side is missing) and
    ``ratios`` its median.

    ``callback`` (from :meth:`Setup.callback_time`: the seconds (b)'s ``CyclicLR`` spent in its
    per-batch hook in each timed call) becomes ``article_callback``: the median call's hook
    milliseconds per step, (b)'s median milliseconds per step, and the hook's share of it.
    """
    for stats in timings.values():
        stats["images_per_s"] = images / stats["median_s"]
        teardown = [
            max(0.0, wall - own)
            for wall, own in zip(stats["wall_samples_s"], stats["samples_s"], strict=True)
        ]
        stats["teardown_median_s"] = statistics.median(teardown)
        stats["teardown_max_s"] = max(teardown)

    def faster(side: str, than: str) -> dict[str, Any] | None:
        """images/s of ``side`` over those of ``than``: ``than``'s seconds over ``side``'s."""
        if side not in timings or than not in timings:
            return None
        return common.paired_ratio(timings[than]["samples_s"], timings[side]["samples_s"])

    paired = {
        "a/b": faster("a", "b"),
        "a/c": faster("a", "c"),
        "b_nocb/b": faster("b_nocb", "b"),
        "a/b_nocb": faster("a", "b_nocb"),
        "a/a_spe1": faster("a", "a_spe1"),
        "a_jit/a": faster("a_jit", "a"),
        "a_augment/a": faster("a_augment", "a"),
    }
    article_callback = None
    if callback is not None and callback["samples_s"] and "b" in timings:
        hook_ms = 1000 * statistics.median(callback["samples_s"]) / info["steps"]
        step_ms = 1000 * timings["b"]["median_s"] / info["steps"]
        article_callback = {
            "hook_ms_per_step": hook_ms,
            "b_ms_per_step": step_ms,
            "share_of_b_step": hook_ms / step_ms,
            "calls": len(callback["samples_s"]),
        }
    return {
        **info,
        "sides": timings,
        "paired": paired,
        "article_callback": article_callback,
        "ratios": {pair: None if p is None else p["median"] for pair, p in paired.items()},
        "epoch_startup": startup,
        "epoch_startup_share_of_a": startup["median_s"] / timings["a"]["median_s"],
    }


def timed_cyclic_lr(**kwargs: Any) -> Any:
    """The article's :class:`~benchmarks.article_callback.CyclicLR` (same arguments), which also
    sums the host seconds spent in its per-batch hook (``hook_s``). Two ``perf_counter`` reads
    per batch are all it adds."""
    from benchmarks.article_callback import CyclicLR

    class TimedCyclicLR(CyclicLR):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.hook_s = 0.0

        def on_train_batch_end(self, batch, logs=None):
            start = time.perf_counter()
            super().on_train_batch_end(batch, logs)
            self.hook_s += time.perf_counter() - start

    return TimedCyclicLR(**kwargs)


class Setup:
    """Builds each side's model and returns its timed call (after one untimed warm-up fit).

    A timed call runs one ``model.fit`` and returns the seconds from the call to the fit's
    ``on_train_end``, leaving out the teardown that follows (see the module).

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

    @staticmethod
    def _timed(fit: Callable[[list], Any]) -> Callable[[], float]:
        """``fit(callbacks)`` as a call that returns the seconds from its start to ``on_train_end``.

        The mark is a callback with no per-batch hook (Keras then adds no per-step work for it)
        that accepts the logs as tensors (no conversion to numbers for its sake).
        """
        from cycleprune.compat import keras

        class TrainEnd(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self._supports_tf_logs = True
                self.at: float | None = None

            def on_train_end(self, logs=None):
                self.at = time.perf_counter()

        mark = TrainEnd()

        def timed() -> float:
            mark.at = None
            start = time.perf_counter()
            fit([mark])
            if mark.at is None:
                raise RuntimeError("model.fit returned without calling on_train_end")
            return mark.at - start

        return timed

    def library(
        self, *, jit: bool = False, augment: bool = False, steps_per_execution: int | None = None
    ) -> Callable[[], Any]:
        from cycleprune import losses, schedules, training

        if steps_per_execution is None:
            steps_per_execution = self.config.train.steps_per_execution

        model = self._model()
        optimizer = schedules.make_optimizer(
            self.config.train,
            self.config.schedule,
            min_lr=self.config.schedule.min_lr,
            max_lr=self.config.schedule.max_lr,
            steps_per_epoch=self.epoch_steps,
        )
        batches = self._batches(augment)
        name = f"a{'-jit' if jit else ''}{'-augment' if augment else ''}-{steps_per_execution}"
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
            steps_per_execution=steps_per_execution,
        )
        epochs = itertools.count(1)
        fit = self._timed(
            lambda callbacks: model.fit(
                batches(next(epochs)), epochs=1, verbose=0, callbacks=callbacks
            )
        )
        if jit:
            model.jit_compile = True  # resets the compiled train function
            fit()  # warm-up: XLA compilation
        return fit

    def article(self, *, jit: bool = False, callback: bool = True) -> Callable[[], Any]:
        """(b): the article's ``fit`` on numpy arrays; ``callback=False`` leaves out its
        ``CyclicLR`` (the LR stays at the lower bound). With the callback, each call also
        appends the host seconds of its per-batch hook to ``self.hook_samples``."""
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
        clr = timed_cyclic_lr(
            base_lr=low, max_lr=high, step_size=self.step_size, mode=self.config.schedule.policy
        )
        per_batch = [clr] if callback else []
        batch = self.config.data.batch_size
        fit = self._timed(
            lambda callbacks: model.fit(
                x,
                y,
                batch_size=batch,
                epochs=1,
                steps_per_epoch=steps,
                class_weight=self.class_weight,
                callbacks=[*per_batch, *callbacks],
                verbose=0,
            )
        )
        fit()  # warm-up: tracing
        if not callback:
            return fit
        self.hook_samples: list[float] = []

        def timed() -> float:
            before = clr.hook_s
            seconds = fit()
            self.hook_samples.append(clr.hook_s - before)
            return seconds

        return timed

    def callback_time(self, timed_calls: int) -> dict[str, list[float]] | None:
        """The hook seconds of (b)'s last ``timed_calls`` calls (the timed rounds, which come
        after any untimed ones), or ``None`` before :meth:`article` ran with its callback."""
        samples = getattr(self, "hook_samples", None)
        if not samples:
            return None
        return {"samples_s": samples[-timed_calls:]}

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
            steps_per_execution=self.config.train.steps_per_execution,
        )
        batches = self._batches()
        epochs = itertools.count()
        fit = self._timed(
            lambda callbacks: model.fit(
                batches(next(epochs)), epochs=1, verbose=0, callbacks=callbacks
            )
        )
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
            iterator = iter(make(epoch))
            next(iterator)
            samples.append(time.perf_counter() - start)
            del iterator  # after the clock: destroying it may wait for tf.data (see the module)
        return common.summarize(samples)
