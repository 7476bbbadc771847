"""cycleprune.schedules: closed-form CLR tables, TF == numpy, serialisation, optimizers."""

from __future__ import annotations

import numpy as np
import pytest

from cycleprune import schedules
from cycleprune.compat import keras, tf
from cycleprune.config import ScheduleConfig, TrainConfig
from cycleprune.schedules import (
    CyclicalLearningRate,
    CyclicalMomentum,
    CyclicalSGD,
    clr,
    clr_momentum,
    clr_step_size,
    make_optimizer,
    whole_cycle_epochs,
)

# min_lr=1e-3, max_lr=1e-1, step_size=4; worked by hand from Smith (2017):
# cycle = floor(1 + it/8), x = |it/4 - 2*cycle + 1|, lr = 1e-3 + 0.099 * max(0, 1-x) * scale
TABLES = {
    "triangular": {
        0: 1e-3,
        1: 0.02575,
        2: 0.0505,
        3: 0.07525,
        4: 0.1,
        6: 0.0505,
        8: 1e-3,
        10: 0.0505,
        12: 0.1,
        16: 1e-3,
    },
    # scale 1 / 2**(cycle - 1): full height in cycle 1, half in cycle 2, a quarter in cycle 3
    "triangular2": {
        0: 1e-3,
        2: 0.0505,
        4: 0.1,
        8: 1e-3,
        10: 0.02575,
        12: 0.0505,
        16: 1e-3,
        20: 0.02575,
    },
    # gamma = 0.9, scale 0.9**it: it 2 -> 1e-3 + 0.099*0.5*0.81; it 4 -> 1e-3 + 0.099*0.6561;
    # it 12 -> 1e-3 + 0.099 * 0.9**12 (0.282429536481)
    "exp_range": {0: 1e-3, 2: 0.041095, 4: 0.0659539, 8: 1e-3, 12: 0.028960524},
}


@pytest.mark.parametrize("policy", sorted(TABLES))
def test_clr_closed_form_table(policy):
    its = np.array(sorted(TABLES[policy]))
    expected = [TABLES[policy][i] for i in its]
    gamma = 0.9 if policy == "exp_range" else 1.0
    np.testing.assert_allclose(clr(its, 1e-3, 1e-1, 4, policy, gamma), expected, rtol=1e-7)
    schedule = CyclicalLearningRate(1e-3, 1e-1, 4, policy=policy, gamma=gamma)
    got = [float(schedule(int(i))) for i in its]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("policy", "gamma"), [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.9995)]
)
def test_tf_schedule_equals_numpy_at_many_steps(policy, gamma):
    steps = np.arange(0, 5000, 7)
    schedule = CyclicalLearningRate(2e-4, 3e-2, 150, policy=policy, gamma=gamma)
    graph = tf.function(schedule)
    got = np.array([graph(tf.constant(s, tf.int64)).numpy() for s in steps[:50]])
    eager = schedule(tf.constant(steps)).numpy()  # vectorised over a tensor of steps
    expected = clr(steps, 2e-4, 3e-2, 150, policy, gamma)
    np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got, expected[:50], rtol=1e-5, atol=1e-9)
    assert eager.dtype == np.float32


def test_fractional_step_size_and_scalar_input():
    assert clr(3, 0.0, 1.0, 1.5).shape == ()
    np.testing.assert_allclose(clr([0, 0.75, 1.5, 3], 0.0, 1.0, 1.5), [0.0, 0.5, 1.0, 0.0])


def test_cyclical_momentum_mirrors_the_lr():
    its = np.arange(0, 17)
    momentum = clr_momentum(its, 0.85, 0.95, 4)
    np.testing.assert_allclose(
        momentum[[0, 2, 4, 6, 8, 12, 16]], [0.95, 0.90, 0.85, 0.90, 0.95, 0.85, 0.95]
    )
    lr = clr(its, 1e-3, 1e-1, 4)
    # Opposite phase: the momentum is lowest exactly where the LR peaks.
    np.testing.assert_array_equal(np.argsort(momentum, kind="stable")[:3], [4, 12, 3])
    assert lr[4] == lr.max() and momentum[4] == momentum.min()
    schedule = CyclicalMomentum(0.85, 0.95, 4, policy="triangular2")
    np.testing.assert_allclose(
        schedule(tf.constant(its)).numpy(),
        clr_momentum(its, 0.85, 0.95, 4, "triangular2"),
        rtol=1e-6,
    )
    assert float(schedule(12)) == pytest.approx(0.90)  # half the amplitude in cycle 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_size": 0}, "Argument `step_size` must be > 0. Received: step_size=0"),
        (
            {"min_lr": 0.1, "max_lr": 0.1},
            "Argument `min_lr` must be < `max_lr`. Received: min_lr=0.1, max_lr=0.1",
        ),
        ({"min_lr": -1.0}, "Argument `min_lr` must be >= 0. Received: min_lr=-1.0"),
        (
            {"policy": "cosine"},
            "Argument `policy` must be one of triangular, triangular2, "
            "exp_range. Received: policy='cosine'",
        ),
        ({"gamma": 0.0}, r"Argument `gamma` must be in \(0, 1\]. Received: gamma=0.0"),
        ({"gamma": 1.5}, r"Argument `gamma` must be in \(0, 1\]. Received: gamma=1.5"),
    ],
)
def test_validation_messages(kwargs, message):
    args = {"min_lr": 1e-3, "max_lr": 1e-1, "step_size": 4} | kwargs
    with pytest.raises(ValueError, match=f"^{message}$".replace("[", r"\[")):
        CyclicalLearningRate(**args)
    with pytest.raises(ValueError):
        clr(0, **args)


def test_momentum_validation():
    with pytest.raises(ValueError, match="Argument `max_momentum` must be <= 1"):
        CyclicalMomentum(0.9, 1.5, 4)
    with pytest.raises(ValueError, match="`min_momentum` must be < `max_momentum`"):
        CyclicalMomentum(0.95, 0.85, 4)


def test_schedules_serialise_round_trip():
    lr = CyclicalLearningRate(1e-3, 1e-1, 12, policy="exp_range", gamma=0.999)
    config = lr.get_config()
    assert config == {
        "min_lr": 1e-3,
        "max_lr": 1e-1,
        "step_size": 12.0,
        "policy": "exp_range",
        "gamma": 0.999,
        "name": "CyclicalLearningRate",
    }
    assert CyclicalLearningRate.from_config(config).get_config() == config
    revived = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(lr))
    assert isinstance(revived, CyclicalLearningRate) and revived.get_config() == config
    momentum = CyclicalMomentum(0.8, 0.9, 5, "triangular2")
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(momentum))
    assert isinstance(again, CyclicalMomentum) and again.get_config() == momentum.get_config()


def _tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, activation="softmax", name="dense")(inputs)
    return keras.Model(inputs, outputs)


def _fit_one_step(model: keras.Model) -> None:
    x = np.ones((4, 3), np.float32)
    y = keras.utils.to_categorical([0, 1, 0, 1], 2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


@pytest.mark.parametrize("cyclical_momentum", [False, True])
def test_optimizer_schedule_survives_model_save_and_load(tmp_path, cyclical_momentum):
    lr = CyclicalLearningRate(1e-3, 1e-1, 4, policy="triangular2")
    if cyclical_momentum:
        optimizer = CyclicalSGD(lr, momentum_schedule=CyclicalMomentum(0.85, 0.95, 4))
    else:
        optimizer = keras.optimizers.SGD(lr, momentum=0.9)
    model = _tiny_model()
    model.compile(optimizer, "categorical_crossentropy")
    _fit_one_step(model)
    path = tmp_path / "tiny.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.iterations.numpy() == 1
    schedule = loaded.optimizer._learning_rate
    assert isinstance(schedule, CyclicalLearningRate)
    assert schedule.get_config() == lr.get_config()
    if cyclical_momentum:
        restored = loaded.optimizer.momentum_schedule
        assert restored.get_config() == optimizer.momentum_schedule.get_config()
    # Training continues from the restored step: the schedule keeps its place in the cycle.
    _fit_one_step(loaded)
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(clr(1, 1e-3, 1e-1, 4)))


def test_cyclical_sgd_applies_the_momentum_schedule_in_graph():
    lr = CyclicalLearningRate(0.01, 0.1, 3)
    momentum = CyclicalMomentum(0.5, 0.9, 3)
    optimizer = CyclicalSGD(lr, momentum_schedule=momentum)
    var = tf.Variable(0.0)

    @tf.function
    def step():
        optimizer.apply_gradients([(tf.constant(1.0), var)])  # d(loss)/d(var) = 1

    its = np.arange(8)
    lrs, ms = clr(its, 0.01, 0.1, 3), clr_momentum(its, 0.5, 0.9, 3)
    velocity, expected = 0.0, 0.0
    for i in its:
        velocity = ms[i] * velocity - lrs[i]  # Keras SGD: v = m * v - lr * g; w = w + v
        expected += velocity
        step()
    assert var.numpy() == pytest.approx(expected, rel=1e-5)
    assert float(optimizer.current_momentum) == pytest.approx(clr_momentum(8, 0.5, 0.9, 3))
    # Without a schedule it is plain SGD with constant momentum.
    plain, ref = CyclicalSGD(0.1, momentum=0.9), keras.optimizers.SGD(0.1, momentum=0.9)
    a, b = tf.Variable(1.0), tf.Variable(1.0)
    for _ in range(3):
        plain.apply_gradients([(tf.constant(0.5), a)])
        ref.apply_gradients([(tf.constant(0.5), b)])
    assert a.numpy() == pytest.approx(b.numpy())


def test_clr_step_size_and_whole_cycles():
    assert clr_step_size(100, 4.0) == 400
    assert clr_step_size(7, 0.5) == 4  # round(3.5) -> 4
    assert clr_step_size(3, 0.1) == 1  # at least one step
    assert whole_cycle_epochs(5, 2.0) == 8
    assert whole_cycle_epochs(32, 4.0) == 32
    assert whole_cycle_epochs(33, 4.0) == 40
    assert whole_cycle_epochs(2, 1.0) == 2
    assert whole_cycle_epochs(1, 0.75) == 2  # one 1.5-epoch cycle -> 2 whole epochs
    with pytest.raises(ValueError, match="Received: steps_per_epoch=0"):
        clr_step_size(0, 4.0)
    with pytest.raises(ValueError, match="Received: step_size_epochs=0"):
        whole_cycle_epochs(4, 0)
    with pytest.raises(ValueError, match="Received: epochs=0"):
        whole_cycle_epochs(0, 2.0)


def test_make_optimizer():
    schedule = ScheduleConfig(policy="triangular2", step_size_epochs=2.0)
    sgd = make_optimizer(
        TrainConfig(momentum=0.8), schedule, min_lr=1e-3, max_lr=1e-1, steps_per_epoch=10
    )
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0.8
    assert sgd._learning_rate.get_config() | {"name": None} == {
        "min_lr": 1e-3,
        "max_lr": 1e-1,
        "step_size": 20.0,
        "policy": "triangular2",
        "gamma": schedule.gamma,
        "name": None,
    }
    cyclic = make_optimizer(
        TrainConfig(),
        ScheduleConfig(cyclical_momentum=True, min_momentum=0.8, max_momentum=0.9),
        min_lr=1e-3,
        max_lr=1e-1,
        steps_per_epoch=10,
    )
    assert isinstance(cyclic, CyclicalSGD)
    assert cyclic.momentum_schedule.get_config()["min_momentum"] == 0.8
    assert cyclic.momentum_schedule.step_size == 40.0
    adam = make_optimizer(
        TrainConfig(optimizer="adam"), ScheduleConfig(), min_lr=1e-4, max_lr=1e-2, steps_per_epoch=5
    )
    assert isinstance(adam, keras.optimizers.Adam)
    assert isinstance(adam._learning_rate, CyclicalLearningRate)
    with pytest.raises(ValueError, match="Cyclical momentum needs SGD"):
        make_optimizer(
            TrainConfig(optimizer="adam"),
            ScheduleConfig(cyclical_momentum=True),
            min_lr=1e-4,
            max_lr=1e-2,
            steps_per_epoch=5,
        )
    with pytest.raises(ValueError, match=r"Received: min_lr=0\.1, max_lr=0\.01"):
        make_optimizer(TrainConfig(), ScheduleConfig(), min_lr=0.1, max_lr=0.01, steps_per_epoch=5)
    with pytest.raises(ValueError, match="Received: min_lr=0"):
        make_optimizer(TrainConfig(), ScheduleConfig(), min_lr=0, max_lr=0.01, steps_per_epoch=5)


def test_module_has_no_callbacks():
    # STYLE.md rule 4: the LR is computed in the graph, never set by a per-batch callback.
    assert not [name for name in dir(schedules) if "Callback" in name]


@pytest.mark.parametrize(
    ("step_size_epochs", "steps_per_epoch", "at_minimum"),
    [(2.0, 74, True), (4.0, 74, True), (1.5, 74, True), (1.5, 75, False), (0.5, 75, False)],
)
def test_whole_cycles_end_on_the_minimum_only_when_the_steps_allow(
    step_size_epochs, steps_per_epoch, at_minimum
):
    epochs = schedules.whole_cycle_epochs(24, step_size_epochs)
    step_size = schedules.clr_step_size(steps_per_epoch, step_size_epochs)
    assert schedules.ends_on_cycle_minimum(epochs, steps_per_epoch, step_size) is at_minimum
    # The closed form agrees: the LR of the step after the last is min_lr exactly when whole.
    after_last = schedules.clr(epochs * steps_per_epoch, 0.0, 1.0, step_size)
    assert (float(after_last) == 0.0) is at_minimum
