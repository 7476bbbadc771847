"""cycleprune.lr_finder: smoothing, the suggestion rule, the sweep, and the range test itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cycleprune import lr_finder
from cycleprune.compat import keras, tf
from cycleprune.config import Config, DataConfig, LRFinderConfig, ModelConfig, TrainConfig, preset
from cycleprune.lr_finder import (
    ExponentialSweep,
    LRFinderError,
    LRFinderResult,
    find_lr,
    smooth_losses,
    suggest_bounds,
    sweep_lrs,
)

# ---------------------------------------------------------------------------- pure functions


def test_smooth_losses_hand_computed():
    # beta = 0.5: avg = 0.5, 1.25, 2.125; corrected by 1 - 0.5**(i+1) = 0.5, 0.75, 0.875
    np.testing.assert_allclose(smooth_losses([1.0, 2.0, 3.0], beta=0.5), [1.0, 5 / 3, 17 / 7])
    # Bias correction: a constant loss stays constant from the first step.
    np.testing.assert_allclose(smooth_losses(np.full(50, 0.7), beta=0.98), 0.7)
    np.testing.assert_array_equal(smooth_losses([3.0, 1.0, 2.0], beta=0.0), [3.0, 1.0, 2.0])
    assert smooth_losses([], beta=0.9).shape == (0,)
    with pytest.raises(ValueError, match=r"Argument `beta` must be in \[0, 1\). Received: beta=1"):
        smooth_losses([1.0], beta=1)


def test_sweep_is_exponential_and_in_graph():
    lrs = sweep_lrs(1e-4, 1.0, 5)
    np.testing.assert_allclose(lrs, [1e-4, 1e-3, 1e-2, 1e-1, 1.0], rtol=1e-12)
    schedule = ExponentialSweep(1e-5, 10.0, 100)
    steps = np.arange(100)
    np.testing.assert_allclose(
        schedule(tf.constant(steps)).numpy(), sweep_lrs(1e-5, 10.0, 100), rtol=1e-6
    )
    config = schedule.get_config()
    revived = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(revived, ExponentialSweep) and revived.get_config() == config
    with pytest.raises(ValueError, match="Argument `end_lr` must be > start_lr"):
        ExponentialSweep(1.0, 0.1, 10)
    with pytest.raises(ValueError, match="Argument `num_steps` must be an int >= 2"):
        sweep_lrs(1e-3, 1.0, 1)


def _u_curve(start: float = -5.0, stop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Plateau 1.0 up to lr 1e-3, a straight fall to 0.2 at lr 1, then a steep rise.

    log10(lr) on a 0.1 grid; the floor is at lr = 1, and the loss is 20% of the depth (0.8)
    below the plateau at log10(lr) = -3 + 3 * 0.2 = -2.4.
    """
    x = np.round(np.arange(start, stop + 1e-9, 0.1), 10)
    loss = np.where(x <= -3, 1.0, 1.0 - 0.8 * (x + 3) / 3)
    loss = np.where(x > 0, 0.2 + 2.0 * x, loss)
    return 10.0**x, loss


def test_suggest_bounds_on_a_clean_valley():
    lrs, loss = _u_curve()
    min_lr, max_lr = suggest_bounds(lrs, loss)
    assert max_lr == pytest.approx(1.0 / 3)  # a factor 3 below the floor at lr = 1
    assert min_lr == pytest.approx(10**-2.4, rel=1e-6)  # a fifth of the way down


def test_suggest_bounds_ignores_plateau_noise_and_the_noisy_start():
    lrs, loss = _u_curve()
    noisy = loss.copy()
    noisy[20] = 0.9  # a dip on the plateau (lr 1e-3): the descent does not start there
    noisy[1:4] = [0.1, 3.0, 0.1]  # wild first points, inside the skipped warm-up
    assert suggest_bounds(lrs, noisy) == pytest.approx(suggest_bounds(lrs, loss))


def test_suggest_bounds_keeps_a_factor_four_on_a_short_valley():
    x = np.round(np.arange(-5.0, 1.0 + 1e-9, 0.1), 10)
    loss = np.where(x <= -0.3, 1.0, 1.0 - 0.8 * (x + 0.3) / 0.3)  # falls from lr 0.5 to 1
    loss = np.where(x > 0, 0.2 + 2.0 * x, loss)
    min_lr, max_lr = suggest_bounds(10.0**x, loss)
    assert max_lr == pytest.approx(1 / 3)
    assert min_lr == pytest.approx(1 / 3 / 4)  # the valley starts above max_lr: capped


@pytest.mark.parametrize(
    ("name", "loss"),
    [
        ("flat", np.full(60, 0.5)),
        ("rising", np.linspace(0.5, 3.0, 60)),
        ("shallow", np.concatenate([np.full(30, 1.0), np.linspace(1.0, 0.97, 30)])),
        # skip 6, then only 4 points from the plateau to the floor before the divergence
        ("too few points", np.concatenate([np.full(8, 1.0), [0.5, 0.2], np.linspace(1, 5, 50)])),
    ],
)
def test_suggest_bounds_rejects_curves_without_a_usable_descent(name, loss):
    lrs = sweep_lrs(1e-5, 10.0, loss.size)
    with pytest.raises(LRFinderError, match="no usable descent"):
        suggest_bounds(lrs, loss)


def test_suggest_bounds_validates_inputs():
    with pytest.raises(ValueError, match="same length"):
        suggest_bounds([1e-3, 1e-2], [1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        suggest_bounds([1e-2, 1e-3, 1e-1, 1, 2, 3], np.ones(6))
    with pytest.raises(ValueError, match="finite"):
        suggest_bounds([1e-3, 1e-2], [1.0, np.nan])
    with pytest.raises(LRFinderError, match="fewer than 5 points"):
        suggest_bounds([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.2])


def test_result_to_dict_is_json_and_round_trips():
    lrs, loss = _u_curve()
    result = LRFinderResult(lrs, loss, smooth_losses(loss), 1e-3, 1e-1, True, lrs.size)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["steps"] == lrs.size and data["stopped_early"] is True
    assert data["rule"] == "steepest_valley"
    again = LRFinderResult.from_dict(data)
    np.testing.assert_array_equal(again.smoothed, result.smoothed)
    assert (again.min_lr, again.max_lr) == (1e-3, 1e-1)


# ------------------------------------------------------------------------------ range test


def _linear_problem(n: int = 256):
    """y = x @ w_true, a dense layer and MSE: descends, then explodes for large LRs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    return model, dataset


def test_find_lr_records_exactly_the_sweep_and_stops_on_non_finite_loss():
    model, dataset = _linear_problem()
    before = [w.copy() for w in model.get_weights()]
    # A huge stop factor disables the divergence test: the sweep runs until the loss overflows.
    config = LRFinderConfig(start_lr=1e-4, end_lr=1e12, num_steps=80, stop_factor=1e30)
    result = find_lr(model, dataset, config, loss=keras.losses.MeanSquaredError(), momentum=0.0)
    assert result.stopped_early and result.steps < 80
    assert np.all(np.isfinite(result.losses))
    np.testing.assert_allclose(result.lrs, sweep_lrs(1e-4, 1e12, 80)[: result.steps])
    np.testing.assert_allclose(result.smoothed, smooth_losses(result.losses, config.beta))
    assert result.losses[-1] > 1e3 * result.losses[0]  # it did blow up before the NaN
    assert 1e-4 < result.min_lr < result.max_lr
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_find_lr_runs_num_steps_over_a_repeated_dataset():
    model, dataset = _linear_problem(64)  # 2 batches per pass: the sweep repeats the data
    config = LRFinderConfig(start_lr=1e-3, end_lr=0.1, num_steps=30)
    result = find_lr(model, dataset, config, loss=keras.losses.MeanSquaredError())
    assert result.steps == 30 and not result.stopped_early
    assert result.losses[-1] < 0.1 * result.losses[0]


def test_find_lr_keeps_the_record_when_there_is_no_descent():
    model, dataset = _linear_problem()
    before = [w.copy() for w in model.get_weights()]
    # One repeated batch and negligible LRs: the loss is the same at every step.
    config = LRFinderConfig(start_lr=1e-12, end_lr=1e-11, num_steps=20)
    with pytest.raises(LRFinderError, match="no usable descent") as caught:
        find_lr(model, dataset.take(1), config, loss=keras.losses.MeanSquaredError())
    record = caught.value.record
    assert len(record["lrs"]) == len(record["losses"]) == 20
    np.testing.assert_allclose(record["losses"], record["losses"][0], rtol=1e-5)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_find_lr_rejects_an_empty_dataset_bad_momentum_and_an_unknown_optimizer():
    model, dataset = _linear_problem()
    config = LRFinderConfig(num_steps=10)
    with pytest.raises(LRFinderError, match="no batches"):
        find_lr(model, dataset.take(0), config, loss=keras.losses.MeanSquaredError())
    with pytest.raises(ValueError, match=r"Received: momentum=1\.0"):
        find_lr(model, dataset, config, loss=keras.losses.MeanSquaredError(), momentum=1.0)
    with pytest.raises(ValueError, match=r"one of sgd, adam\. Received: optimizer='rmsprop'"):
        find_lr(model, dataset, config, loss=keras.losses.MeanSquaredError(), optimizer="rmsprop")


def test_find_lr_sweeps_with_adam_when_the_training_uses_adam():
    """The sweep trains with the training's optimizer: step for step, Adam's own loss curve."""
    model, dataset = _linear_problem(128)
    config = LRFinderConfig(start_lr=1e-3, end_lr=10.0, num_steps=24, stop_factor=1e30)
    loss = keras.losses.MeanSquaredError()
    initial = [w.copy() for w in model.get_weights()]
    result = find_lr(model, dataset, config, loss=loss, optimizer="adam")
    assert result.optimizer == "adam" and result.steps == 24
    assert LRFinderResult.from_dict(json.loads(json.dumps(result.to_dict()))).optimizer == "adam"
    # By hand: Keras' Adam under the same exponential sweep, over the same batches.
    reference = keras.models.clone_model(model)
    reference.set_weights(initial)
    adam = keras.optimizers.Adam(learning_rate=ExponentialSweep(1e-3, 10.0, 24))
    expected = []
    for x, y in dataset.repeat().take(24):
        with tf.GradientTape() as tape:
            value = loss(y, reference(x, training=True))
        variables = reference.trainable_variables
        adam.apply_gradients(zip(tape.gradient(value, variables), variables, strict=True))
        expected.append(float(value))
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    sgd = find_lr(model, dataset, config, loss=loss)
    assert sgd.optimizer == "sgd" and not np.allclose(sgd.losses, result.losses, rtol=1e-2)


def test_find_lr_on_real_data(tiny_dataset):
    """The range test on a 240-image slice of PneumoniaMNIST with the tiny VGG (width 0.125, BN).

    Known good range for this setup (checked by hand: SGD(momentum 0.9), batch 16, focal loss,
    balanced class weights, 6 epochs at a constant LR): the training loss falls too slowly at
    1e-4, well from 1e-3, best at 1e-2..3e-1 and worse again at 1 and above. So min_lr ~ 1e-3
    and max_lr ~ 1e-1..3e-1; the suggestion must land within about a decade: min_lr in
    [1e-4, 2e-2], max_lr in [1e-2, 1]. (Multi-threaded CPU kernels sum in varying order, so the
    curve, and min_lr with it, moves a little between runs: 0.0117 and 0.0125 were seen under
    load.) A sweep to LR 100 must diverge.
    """
    from cycleprune import data, losses, models

    data_config = DataConfig(batch_size=32)
    info = data.load_info(tiny_dataset)
    weights = data.class_weights(info, data_config)
    dataset = data.make_dataset(
        tiny_dataset, "train", data_config, training=True, class_weight=weights
    )
    model = models.build_model(ModelConfig(width=0.125, batch_norm=True), (28, 28, 1), 2, seed=1)
    loss = losses.make_loss(TrainConfig())
    # A compiled, already-used optimizer must be left exactly as it was.
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
    model.fit(dataset.take(1), verbose=0)
    weights_before = [w.copy() for w in model.get_weights()]
    optimizer_before = [v.numpy().copy() for v in model.optimizer.variables]
    assert len(optimizer_before) > 1

    config = LRFinderConfig(start_lr=1e-5, end_lr=100.0, num_steps=100)
    result = find_lr(model, dataset, config, loss=loss, momentum=0.9)

    # The sweep diverges: it ends far above its floor (about 30x here). The divergence test
    # stops it at step 99 of 100 on a quiet machine, but not always under load: multi-threaded
    # CPU kernels sum in varying order, and at LR 50-100 that decides the last steps.
    assert result.steps <= 100
    assert result.losses[-1] > 5 * result.smoothed.min()
    assert 1e-4 <= result.min_lr <= 2e-2, result.min_lr
    assert 1e-2 <= result.max_lr <= 1.0, result.max_lr
    for a, b in zip(weights_before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit, BatchNorm statistics included
    optimizer_after = [v.numpy() for v in model.optimizer.variables]
    assert len(optimizer_after) == len(optimizer_before)
    for a, b in zip(optimizer_before, optimizer_after, strict=True):
        np.testing.assert_array_equal(a, b)


def _smoke_config(**lr_finder_fields) -> Config:
    base = preset("smoke")
    return base.replace(
        data=DataConfig(batch_size=32),
        lr_finder=LRFinderConfig(
            **({"start_lr": 1e-5, "end_lr": 100.0, "num_steps": 60} | lr_finder_fields)
        ),
    )


def test_run_lr_finder_writes_json_and_plot(tiny_dataset, tmp_path):
    out = tmp_path / "lr_finder"
    result = lr_finder.run_lr_finder(tiny_dataset, out, _smoke_config())
    assert sorted(p.name for p in out.iterdir()) == ["lr_finder.json", "lr_finder.png"]
    saved = json.loads((out / "lr_finder.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert saved["min_lr"] < saved["max_lr"] and len(saved["lrs"]) == saved["steps"]
    assert (out / "lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_lr_finder_sweeps_the_configured_training_optimizer(tiny_dataset, tmp_path):
    import dataclasses

    config = _smoke_config()
    sgd = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "sgd", config)
    adam_config = config.replace(train=dataclasses.replace(config.train, optimizer="adam"))
    adam = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "adam", adam_config)
    saved = json.loads((tmp_path / "adam" / "lr_finder.json").read_text())
    assert saved["optimizer"] == "adam" and sgd.optimizer == "sgd"
    # Adam's sweep descends at far smaller rates than SGD's: its min_lr is 18x lower here, and
    # 4-12x lower on the full `small` data in each of 3 seeds (its max_lr there varies more).
    assert adam.min_lr < sgd.min_lr / 4, (adam.min_lr, sgd.min_lr)


def test_run_lr_finder_sweeps_with_the_momentum_training_has_at_its_peak_lr(tiny_dataset, tmp_path):
    import dataclasses

    config = _smoke_config()
    train, schedule = config.train, config.schedule
    # Under cyclical momentum, train.momentum is unused: the sweep takes min_momentum (0.85),
    # training's momentum at max_lr, whatever train.momentum says.
    cyclical = config.replace(
        train=dataclasses.replace(train, momentum=0.0),
        schedule=dataclasses.replace(schedule, cyclical_momentum=True),
    )
    assert lr_finder.sweep_momentum(cyclical) == schedule.min_momentum == 0.85
    constant = config.replace(train=dataclasses.replace(train, momentum=0.85))
    swept = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "cyclical", cyclical)
    same = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "constant", constant)
    np.testing.assert_allclose(swept.losses, same.losses, rtol=1e-6)
    plain = config.replace(train=dataclasses.replace(train, momentum=0.0))
    without = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "none", plain)
    assert not np.allclose(without.losses, swept.losses, rtol=1e-3)


def test_run_lr_finder_writes_nothing_when_it_fails(tiny_dataset, tmp_path, monkeypatch):
    from cycleprune import plots

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_lr_finder", broken_plot)
    out = tmp_path / "lr_finder"
    with pytest.raises(RuntimeError, match="disk full"):
        lr_finder.run_lr_finder(tiny_dataset, out, _smoke_config(num_steps=20))
    assert not out.exists()  # not even the JSON: the folder appears whole or not at all
    assert not list(tmp_path.iterdir())


def test_run_lr_finder_refuses_a_foreign_output_folder_before_sweeping(
    tiny_dataset, tmp_path, monkeypatch
):
    def no_sweep(*args, **kwargs):
        raise AssertionError("swept although the output folder would be refused")

    monkeypatch.setattr(lr_finder, "find_lr", no_sweep)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"mine is not empty and holds no lr_finder\.json"):
        lr_finder.run_lr_finder(tiny_dataset, out, _smoke_config())
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_configured_bounds_win_and_survive_a_curve_without_descent(
    tiny_dataset, tmp_path, monkeypatch
):
    import dataclasses

    cfg = _smoke_config(num_steps=20)
    cfg = cfg.replace(schedule=dataclasses.replace(cfg.schedule, min_lr=1e-3, max_lr=1e-1))
    result = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "ok", cfg)
    assert (result.min_lr, result.max_lr, result.bounds_from) == (1e-3, 1e-1, "config")

    def no_descent(*args, **kwargs):
        raise lr_finder.LRFinderError("no usable descent: flat")

    monkeypatch.setitem(lr_finder.SUGGESTION_RULES, cfg.lr_finder.rule, no_descent)
    result = lr_finder.run_lr_finder(tiny_dataset, tmp_path / "flat", cfg)
    assert (result.min_lr, result.max_lr, result.bounds_from) == (1e-3, 1e-1, "config")
    assert result.suggested_min_lr is None and "no usable descent" in result.note
    saved = json.loads((tmp_path / "flat" / "lr_finder.json").read_text())
    assert saved["bounds_from"] == "config" and saved["suggested_max_lr"] is None
    assert len(saved["lrs"]) == saved["steps"] > 0
    # A sweep that diverged is reported as stopped early, suggestion or not.
    wild = cfg.replace(lr_finder=dataclasses.replace(cfg.lr_finder, end_lr=1e6))
    lr_finder.run_lr_finder(tiny_dataset, tmp_path / "wild", wild)
    diverged = json.loads((tmp_path / "wild" / "lr_finder.json").read_text())
    assert diverged["stopped_early"] is True and diverged["steps"] < 20
    # Without configured bounds the same curve is an error, never nonsense bounds.
    auto = cfg.replace(schedule=dataclasses.replace(cfg.schedule, min_lr=0.0, max_lr=0.0))
    with pytest.raises(lr_finder.LRFinderError, match="no usable descent"):
        lr_finder.run_lr_finder(tiny_dataset, tmp_path / "auto", auto)
    assert not (tmp_path / "auto").exists()


def test_every_configurable_rule_is_implemented():
    from cycleprune import config

    assert set(lr_finder.SUGGESTION_RULES) == set(config.SUGGESTION_RULES)


# ------------------------------------------------------------------- preemption and crashes


def _interrupt_at(dataset, element: int, action):
    """``dataset`` that runs ``action()`` when it produces its ``element``-th batch (1-based,
    counted over every pass)."""
    produced = [0]

    def tick():
        produced[0] += 1
        if produced[0] == element:
            action()
        return np.int64(produced[0])

    def mark(x, y):
        token = tf.py_function(tick, [], tf.int64)
        with tf.control_dependencies([token]):
            return tf.identity(x), y

    return dataset.map(mark)


def test_find_lr_resumes_after_sigterm_with_the_same_record(tmp_path):
    import os
    import signal

    from cycleprune.preemption import PreemptedError

    config = LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=30)
    loss = keras.losses.MeanSquaredError()
    model, dataset = _linear_problem(128)  # 4 batches per pass
    before = [w.copy() for w in model.get_weights()]
    straight = find_lr(model, dataset, config, loss=loss)  # it restores the weights afterwards

    sigterm = _interrupt_at(dataset, 12, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(PreemptedError) as caught:
        find_lr(model, sigterm, config, loss=loss, checkpoint_dir=tmp_path)
    # tf.data reads ahead, so the signal comes while one of the steps before batch 12 runs;
    # the sweep stops after that step and saves it.
    step = caught.value.step
    assert 1 <= step <= 11 and caught.value.checkpoint.endswith(f"sweep-{step}")
    state = json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())
    assert len(state["losses"]) == step and not state["done"]
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # restored even when stopped

    resumed = find_lr(model, dataset, config, loss=loss, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    assert (resumed.min_lr, resumed.max_lr) == (straight.min_lr, straight.max_lr)
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_find_lr_resumes_from_its_last_checkpoint_after_a_crash(tmp_path):
    config = LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=30)
    loss = keras.losses.MeanSquaredError()
    model, dataset = _linear_problem(128)
    straight = find_lr(model, dataset, config, loss=loss)  # it restores the weights afterwards

    def crash():
        raise RuntimeError("node lost")

    with pytest.raises(Exception, match="node lost"):
        find_lr(
            model, _interrupt_at(dataset, 18, crash), config, loss=loss, checkpoint_dir=tmp_path
        )
    # One checkpoint per pass over the data (4 batches): the last one before the crash is 16.
    state = json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())
    assert len(state["losses"]) == 16 and state["checkpoint"] == "sweep-16"

    resumed = find_lr(model, dataset, config, loss=loss, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    assert json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())["done"] is True

    # A finished sweep is not run again: even data that would crash at once is never read.
    again = find_lr(
        model, _interrupt_at(dataset, 1, crash), config, loss=loss, checkpoint_dir=tmp_path
    )
    np.testing.assert_array_equal(again.losses, straight.losses)
    assert again.stopped_early == straight.stopped_early
    # Other sweep settings do not reuse the record.
    other = LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=24)
    assert find_lr(model, dataset, other, loss=loss, checkpoint_dir=tmp_path).steps == 24


def test_a_sweep_record_of_another_model_momentum_or_optimizer_is_not_reused(tmp_path):
    config = LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=30)
    loss = keras.losses.MeanSquaredError()
    model, dataset = _linear_problem(128)
    first = find_lr(model, dataset, config, loss=loss, checkpoint_dir=tmp_path)
    plain = find_lr(model, dataset, config, loss=loss, momentum=0.0)  # no record: the truth
    again = find_lr(model, dataset, config, loss=loss, momentum=0.0, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(again.losses, plain.losses)
    assert not np.array_equal(again.losses, first.losses)
    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    shapes = json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())["settings"]["model"]
    assert [s for _, s in shapes] == [[4, 1], [1]]
    find_lr(wider, dataset, config, loss=loss, momentum=0.0, checkpoint_dir=tmp_path)
    shapes = json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())["settings"]["model"]
    assert [s for _, s in shapes] == [[4, 2], [2]]  # swept again, not read back
    # The record is the same model's at the same momentum: only the optimizer differs.
    adam = find_lr(wider, dataset, config, loss=loss, momentum=0.0, optimizer="adam")
    resumed = find_lr(
        wider, dataset, config, loss=loss, momentum=0.0, optimizer="adam", checkpoint_dir=tmp_path
    )
    np.testing.assert_array_equal(resumed.losses, adam.losses)
    settings = json.loads((tmp_path / lr_finder.SWEEP_STATE).read_text())["settings"]
    assert settings["optimizer"] == "adam"


def test_the_sweep_covers_every_configurable_optimizer():
    from cycleprune import config

    assert set(config.OPTIMIZERS) == set(lr_finder.SWEEP_OPTIMIZERS)


def test_a_broken_sweep_record_or_checkpoint_means_sweeping_again(tmp_path):
    config = LRFinderConfig(start_lr=1e-4, end_lr=1.0, num_steps=30)
    loss = keras.losses.MeanSquaredError()
    model, dataset = _linear_problem(128)
    straight = find_lr(model, dataset, config, loss=loss)

    def crash():
        raise RuntimeError("node lost")

    with pytest.raises(Exception, match="node lost"):
        find_lr(
            model, _interrupt_at(dataset, 18, crash), config, loss=loss, checkpoint_dir=tmp_path
        )
    for path in tmp_path.glob("sweep-16*"):
        path.unlink()  # the record names a checkpoint that is gone
    resumed = find_lr(model, dataset, config, loss=loss, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
    (tmp_path / lr_finder.SWEEP_STATE).write_text('{"settings": {}}')  # no losses
    resumed = find_lr(model, dataset, config, loss=loss, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.losses, straight.losses)
