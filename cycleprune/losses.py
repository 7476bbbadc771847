"""Training losses: categorical focal loss (as in the article) and cross-entropy."""

from __future__ import annotations

from cycleprune.compat import keras, tf
from cycleprune.config import TrainConfig

_EPSILON = 1e-7  # the same clip as keras' categorical cross-entropy


@keras.utils.register_keras_serializable(package="cycleprune")
class CategoricalFocalLoss(keras.losses.Loss):
    """Focal loss for one-hot targets and softmax probabilities (Lin et al. 2017).

    ``FL(y, p) = -sum_c alpha * y_c * (1 - p_c)**gamma * log(p_c)``

    with ``p`` normalised to sum to 1 and clipped to ``[1e-7, 1 - 1e-7]`` for stability, and
    ``y`` optionally label-smoothed: ``y <- y * (1 - label_smoothing) + label_smoothing / K``.
    With ``gamma=0`` and ``alpha=1`` it is exactly the categorical cross-entropy. The focusing
    term ``(1 - p_c)**gamma`` down-weights well-classified examples; ``alpha`` scales the loss.

    Reference: T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object
    Detection", ICCV 2017, https://arxiv.org/abs/1708.02002.

    Args:
        gamma: Focusing parameter, >= 0.
        alpha: Weighting factor, in (0, 1].
        label_smoothing: In [0, 1).
        reduction: Keras loss reduction.
        name: Loss name.

    Raises:
        ValueError: an argument out of range.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float = 0.25,
        label_smoothing: float = 0.0,
        reduction: str = keras.losses.Reduction.AUTO,
        name: str = "categorical_focal_loss",
    ) -> None:
        if not gamma >= 0:
            raise ValueError(f"Argument `gamma` must be >= 0. Received: gamma={gamma}")
        if not 0 < alpha <= 1:
            raise ValueError(f"Argument `alpha` must be in (0, 1]. Received: alpha={alpha}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(
                f"Argument `label_smoothing` must be in [0, 1). Received: "
                f"label_smoothing={label_smoothing}"
            )
        super().__init__(reduction=reduction, name=name)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.cast(y_true, y_pred.dtype)
        if self.label_smoothing:
            num_classes = tf.cast(tf.shape(y_true)[-1], y_pred.dtype)
            y_true = y_true * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        y_pred = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        y_pred = tf.clip_by_value(y_pred, _EPSILON, 1.0 - _EPSILON)
        focal = self.alpha * tf.pow(1.0 - y_pred, self.gamma)
        return -tf.reduce_sum(y_true * focal * tf.math.log(y_pred), axis=-1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"gamma": self.gamma, "alpha": self.alpha, "label_smoothing": self.label_smoothing}
        )
        return config


def make_loss(config: TrainConfig) -> keras.losses.Loss:
    """The training loss a ``TrainConfig`` asks for.

    Args:
        config: ``loss`` (``focal`` or ``crossentropy``), ``focal_gamma``, ``focal_alpha`` and
            ``label_smoothing``.

    Returns:
        :class:`CategoricalFocalLoss` or ``keras.losses.CategoricalCrossentropy``; both expect
        one-hot targets and probabilities.

    Raises:
        ValueError: an unknown ``config.loss``.
    """
    if config.loss == "focal":
        return CategoricalFocalLoss(
            gamma=config.focal_gamma,
            alpha=config.focal_alpha,
            label_smoothing=config.label_smoothing,
        )
    if config.loss == "crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    raise ValueError(f"Unknown loss. Received: loss={config.loss!r}")
