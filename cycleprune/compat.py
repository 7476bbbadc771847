"""The one place that imports TensorFlow and Keras.

tensorflow-model-optimization supports Keras 2 only, so the project uses ``tf_keras`` (Keras 2)
and tells TensorFlow to do the same (``TF_USE_LEGACY_KERAS=1``) before TensorFlow is imported.
Every other module does ``from cycleprune.compat import keras, tf``; nothing imports ``tf.keras``
or ``keras`` directly.
"""

from __future__ import annotations

import os

# Must be set before the first `import tensorflow` anywhere in the process: TensorFlow reads it
# once to decide what `tf.keras` is, and tfmot reads `tf.keras`.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
import tf_keras as keras

__all__ = ["keras", "tf"]
