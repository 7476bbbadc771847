"""benchmarks.sam: one SAM step against the update written out by hand."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import sam
from cycleprune.compat import keras


def _model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4)(inputs)
    hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Activation("relu")(hidden))
    return keras.Model(inputs, outputs)


def _batch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = (rng.random(8) > 0.5).astype("float32")[:, None]
    return x, y


def _loss(model, x, y, training=True):
    return keras.losses.BinaryCrossentropy()(y, model(x, training=training))


def _grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = _loss(model, x, y)
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_one_step_uses_the_gradient_at_the_perturbed_weights(rho):
    x, y = _batch()
    lr = 0.1
    # The update by hand: gradient g at w, then the gradient at w + rho g / ||g||, one SGD step.
    reference = _model()
    weights = [v.numpy() for v in reference.trainable_variables]
    grads = _grads(reference, x, y)
    norm = np.sqrt(sum(float(np.sum(g**2)) for g in grads))
    for variable, w, g in zip(reference.trainable_variables, weights, grads, strict=True):
        variable.assign(w + rho * g / norm)
    adv = _grads(reference, x, y)
    expected = [w - lr * g for w, g in zip(weights, adv, strict=True)]
    plain = [w - lr * g for w, g in zip(weights, grads, strict=True)]

    model = sam.with_sam(_model(), rho)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.BinaryCrossentropy())
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    got = [v.numpy() for v in model.trainable_variables]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    # ... which is not the plain step (the test can tell the two apart).
    assert max(np.max(np.abs(g - p)) for g, p in zip(got, plain, strict=True)) > 1e-4
    # The reported loss is the first pass's, at the unperturbed weights.
    first = _model()
    assert history.history["loss"][0] == pytest.approx(float(_loss(first, x, y)), rel=1e-5)


def test_batchnorm_statistics_move_once_per_step():
    x, y = _batch()
    plain = _model()
    plain.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.BinaryCrossentropy())
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    model = sam.with_sam(_model(), 0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.BinaryCrossentropy())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    # Moving mean and variance after one step: the plain step's (first pass at w), not moved again
    # by the second pass at w + e.
    before = _model().get_layer(index=2).get_weights()[2:]
    for got, want, start in zip(
        model.get_layer(index=2).get_weights()[2:],
        plain.get_layer(index=2).get_weights()[2:],
        before,
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        assert np.max(np.abs(got - start)) > 1e-3  # they did move


def test_sample_weights_and_regularization_enter_the_second_gradient():
    # The second pass computes its loss outside compute_loss; with per-image weights (the class
    # weights of training) and an L2 penalty it must still be the loss compute_loss would take.
    x, y = _batch()
    weights = np.linspace(0.5, 2.0, len(x)).astype("float32")
    rho, lr = 0.3, 0.1

    def regularized(seed=0):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
        hidden = keras.layers.BatchNormalization()(hidden)
        outputs = keras.layers.Dense(1, activation="sigmoid")(
            keras.layers.Activation("relu")(hidden)
        )
        return keras.Model(inputs, outputs)

    def grads(model):
        with tf.GradientTape() as tape:
            loss = keras.losses.BinaryCrossentropy()(y, model(x, training=True), weights)
            loss += tf.add_n(model.losses)
        return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

    reference = regularized()
    start = [v.numpy() for v in reference.trainable_variables]
    first = grads(reference)
    norm = np.sqrt(sum(float(np.sum(g**2)) for g in first))
    for variable, w, g in zip(reference.trainable_variables, start, first, strict=True):
        variable.assign(w + rho * g / norm)
    expected = [w - lr * g for w, g in zip(start, grads(reference), strict=True)]

    model = sam.with_sam(regularized(), rho)
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.BinaryCrossentropy(),
        steps_per_execution=2,
    )
    model.fit(x, y, sample_weight=weights, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for got, want in zip(model.trainable_variables, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_bad_rho_and_unsupported_models_are_refused():
    for rho in (0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rho="):
            sam.with_sam(_model(), rho)

    class TwoReplicas(keras.Model):
        @property
        def distribute_strategy(self):
            return types.SimpleNamespace(num_replicas_in_sync=2)

    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match=r"'two'.*2 replicas"):
        sam.with_sam(TwoReplicas(inputs, keras.layers.Dense(1)(inputs), name="two"), 0.05)

    class OwnStep(keras.Model):
        def train_step(self, data):
            return {}

    with pytest.raises(ValueError, match=r"'own'.*OwnStep.*own train_step"):
        sam.with_sam(OwnStep(inputs, keras.layers.Dense(1)(inputs), name="own"), 0.05)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((3,))
        half = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="half")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(ValueError, match=r"'half'.*mixed_float16"):
        sam.with_sam(half, 0.05)


def test_sam_models_patches_build_model_only_inside():
    from cycleprune import models

    build = models.build_model
    with sam.sam_models(0.05):
        assert models.build_model is not build
    assert models.build_model is build
    with pytest.raises(SystemExit):  # --rho must be positive: refused before any training
        sam.main(["--rho", "-1", "--preset", "smoke"])
