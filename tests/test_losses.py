"""cycleprune.losses: focal loss values, its cross-entropy limit, serialisation, make_loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cycleprune.compat import keras
from cycleprune.config import TrainConfig
from cycleprune.losses import CategoricalFocalLoss, make_loss

Y = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
P = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]], np.float32)


def test_hand_computed_values():
    loss = CategoricalFocalLoss(gamma=2.0, alpha=0.25, reduction="none")
    # -alpha * (1 - p_true)**gamma * log(p_true), per example
    expected = [
        -0.25 * 0.1**2 * math.log(0.9),  # 0.000263401
        -0.25 * 0.4**2 * math.log(0.6),  # 0.020433025
        -0.25 * 0.2**2 * math.log(0.8),  # 0.002231436
    ]
    np.testing.assert_allclose(loss(Y, P).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(
        CategoricalFocalLoss(gamma=2.0, alpha=0.25)(Y, P).numpy(), np.mean(expected), rtol=1e-5
    )
    np.testing.assert_allclose(np.mean(expected), 0.007642621, rtol=1e-6)


def test_gamma_zero_alpha_one_is_crossentropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 3)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    for smoothing in (0.0, 0.1):
        focal = CategoricalFocalLoss(gamma=0.0, alpha=1.0, label_smoothing=smoothing)
        cce = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        np.testing.assert_allclose(
            focal(labels, probs).numpy(), cce(labels, probs).numpy(), rtol=1e-6
        )


def test_label_smoothing_value():
    loss = CategoricalFocalLoss(gamma=1.0, alpha=0.5, label_smoothing=0.2, reduction="none")
    # y = [0.9, 0.1] for target class 0 with two classes
    expected = -0.5 * (0.9 * 0.1 * math.log(0.9) + 0.1 * 0.9 * math.log(0.1))
    np.testing.assert_allclose(loss(Y[:1], P[:1]).numpy(), [expected], rtol=1e-5)


def test_confident_mistakes_stay_finite_and_sample_weights_apply():
    y = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    p = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    values = CategoricalFocalLoss(gamma=2.0, alpha=1.0, reduction="none")(y, p).numpy()
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values[0], -math.log(1e-7), rtol=1e-3)  # clipped at 1e-7
    weighted = CategoricalFocalLoss(gamma=2.0, alpha=0.25)(Y, P, sample_weight=[0.0, 1.0, 0.0])
    np.testing.assert_allclose(weighted.numpy(), -0.25 * 0.16 * math.log(0.6) / 3, rtol=1e-5)


def test_serialisation_round_trip():
    loss = CategoricalFocalLoss(gamma=1.5, alpha=0.5, label_smoothing=0.1, name="focal")
    config = loss.get_config()
    assert config["gamma"] == 1.5 and config["alpha"] == 0.5 and config["label_smoothing"] == 0.1
    restored = CategoricalFocalLoss.from_config(config)
    np.testing.assert_allclose(restored(Y, P).numpy(), loss(Y, P).numpy())
    revived = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(revived, CategoricalFocalLoss) and revived.get_config() == config
    assert (
        keras.saving.get_registered_name(CategoricalFocalLoss) == "cycleprune>CategoricalFocalLoss"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, "Argument `gamma` must be >= 0. Received: gamma=-1.0"),
        ({"alpha": 0.0}, r"Argument `alpha` must be in \(0, 1\]. Received: alpha=0.0"),
        ({"label_smoothing": 1.0}, r"must be in \[0, 1\). Received: label_smoothing=1.0"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CategoricalFocalLoss(**kwargs)


def test_make_loss():
    focal = make_loss(
        TrainConfig(loss="focal", focal_gamma=1.0, focal_alpha=0.5, label_smoothing=0.1)
    )
    assert isinstance(focal, CategoricalFocalLoss)
    assert (focal.gamma, focal.alpha, focal.label_smoothing) == (1.0, 0.5, 0.1)
    cce = make_loss(TrainConfig(loss="crossentropy", label_smoothing=0.05))
    assert isinstance(cce, keras.losses.CategoricalCrossentropy)
    assert cce.get_config()["label_smoothing"] == 0.05
