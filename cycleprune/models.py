"""The classifiers (the article's VGG-style network, or a ResNet-18-style one), and loading them.

``vgg`` (the article's) is VGG16's convolutional stack (Simonyan & Zisserman 2015, "Very Deep
Convolutional Networks for Large-Scale Image Recognition") with a global-average-pooling head:
five blocks of 3x3 same-padded ReLU convolutions with 64, 64 | 128, 128 | 256 x3 | 512 x3 |
512 x3 filters, a 2x2 max pool after each of the first four blocks, then GlobalAveragePooling2D,
optional Dropout and a softmax Dense layer.

``resnet`` is ResNet-18's stack (He et al. 2016, "Deep Residual Learning for Image
Recognition") in its small-image form: a 3x3 stem convolution at full resolution (no 7x7
stride-2 stem, no max pool), then four stages of two basic blocks (two 3x3 convolutions with
BatchNorm, an identity shortcut, or a 1x1 projection where the shape changes) with 64, 128,
256, 512 filters, stride 2 at the start of stages 2-4, and the same head.

Both take raw pixels (float32, 0..255) and rescale and resize them themselves, so an exported
model accepts images exactly as the prepared dataset stores them.
"""

from __future__ import annotations

import os
from pathlib import Path

from cycleprune.compat import keras
from cycleprune.config import ModelConfig

# (filters, convolutions) per block; pooling follows every block but the last.
VGG_BLOCKS: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# ResNet-18: filters per stage, two basic blocks each; stages 2-4 start with stride 2.
RESNET_STAGES: tuple[int, ...] = (64, 128, 256, 512)
RESNET_BLOCKS = 2
_POOLED_BLOCKS = len(VGG_BLOCKS) - 1
# Four 2x2 "valid" pools need a side of at least 2**4 to leave a 1x1 map for the last block.
MIN_SIDE = 2**_POOLED_BLOCKS


def scaled_filters(filters: int, width: float) -> int:
    """Filters of a block at a width multiplier: ``max(1, round(filters * width))``."""
    return max(1, round(filters * width))


def build_model(
    config: ModelConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    seed: int | None = None,
) -> keras.Model:
    """Build the classifier ``config.arch`` names: ``vgg`` (the article's) or ``resnet``.

    Layers, in order: ``rescale`` (x / 255), ``resize`` (only when ``config.input_size > 0`` and it
    differs from the input side), the body, ``avg_pool``; optional ``dropout``; ``predictions``
    (Dense softmax, float32 even under a mixed-precision policy).

    ``vgg``'s body, per block ``b`` and convolution ``i``: ``block{b}_conv{i}`` (3x3, same
    padding; without bias when followed by BatchNorm), optionally ``block{b}_bn{i}``,
    ``block{b}_relu{i}``; ``block{b}_pool`` after blocks 1-4. At ``width=1.0`` without BatchNorm,
    a 28x28x1 input and 2 classes, the model has 14,714,562 parameters (VGG16's 14,714,688 conv
    parameters for a 1-channel input, plus the head).

    ``resnet``'s body: ``stem_conv``, ``stem_bn``, ``stem_relu``; then per stage ``s`` and block
    ``b``: ``stage{s}_block{b}_conv1``/``_bn1``/``_relu1``, ``_conv2``/``_bn2``, where the shape
    changes ``_shortcut``/``_shortcut_bn`` (1x1 projection), ``_add`` and ``_relu``. Its
    convolutions have no bias (BatchNorm follows each). At ``width=1.0``, a 28x28x1 input and 2
    classes, the model has 11,178,306 parameters (ResNet-18 for CIFAR-sized images, 1 channel).

    Convolutions are initialised He-uniform (He et al. 2015, "Delving Deep into Rectifiers"),
    the initialisation derived for ReLU stacks; the classifier is Glorot-uniform. Why: on the
    bundled data, the full-width network without BatchNorm (the article's) under SGD(0.1, 0.9)
    stays at a constant prediction for 240 steps with Keras' default Glorot initialisation,
    and reaches a validation AUC of 0.97 with He's.

    Args:
        config: Architecture, width multiplier, input size, BatchNorm and dropout.
        input_shape: ``(height, width, channels)`` of the raw images.
        num_classes: Number of classes (>= 2) of the softmax output.
        seed: Seed for the weight initialisers and dropout; the same seed gives the same initial
            weights. ``None`` draws them from the global random state.

    Returns:
        An uncompiled functional ``keras.Model`` named after ``config.arch``, from float32 images
        0..255 of ``input_shape`` to class probabilities ``[batch, num_classes]`` (float32).

    Raises:
        ValueError: a bad ``input_shape`` or ``num_classes``, or (``vgg``) an input too small for
            four 2x2 poolings (side < 16 after resizing).
    """
    input_shape = _check_input_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Argument `num_classes` must be an int >= 2. Received: {num_classes=}")
    height, width_px, _ = input_shape
    side = config.input_size if config.input_size > 0 else min(height, width_px)
    if config.arch == "vgg" and side < MIN_SIDE:
        raise ValueError(
            f"The model needs images of at least {MIN_SIDE}x{MIN_SIDE} (four 2x2 poolings); set "
            f"model.input_size >= {MIN_SIDE}. Received: input_shape={input_shape}, "
            f"input_size={config.input_size}"
        )
    seeds = _SeedSequence(seed)

    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if config.input_size > 0 and (height, width_px) != (config.input_size, config.input_size):
        x = keras.layers.Resizing(config.input_size, config.input_size, name="resize")(x)
    body = {"vgg": _vgg_body, "resnet": _resnet_body}[config.arch]
    x = body(x, config, seeds)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, seed=seeds.next(), name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=seeds.glorot_uniform(),
        dtype="float32",
        name="predictions",
    )(x)
    return keras.Model(inputs, outputs, name=config.arch)


def _vgg_body(x, config: ModelConfig, seeds: _SeedSequence):
    for b, (filters, convs) in enumerate(VGG_BLOCKS, start=1):
        n = scaled_filters(filters, config.width)
        for i in range(1, convs + 1):
            x = keras.layers.Conv2D(
                n,
                3,
                padding="same",
                use_bias=not config.batch_norm,
                kernel_initializer=seeds.he_uniform(),
                name=f"block{b}_conv{i}",
            )(x)
            if config.batch_norm:
                x = keras.layers.BatchNormalization(
                    momentum=config.bn_momentum, name=f"block{b}_bn{i}"
                )(x)
            x = keras.layers.Activation("relu", name=f"block{b}_relu{i}")(x)
        if b <= _POOLED_BLOCKS:
            x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    return x


def _resnet_body(x, config: ModelConfig, seeds: _SeedSequence):
    def conv(x, filters: int, kernel: int, stride: int, name: str):
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=seeds.he_uniform(),
            name=name,
        )(x)

    def bn(x, name: str):
        return keras.layers.BatchNormalization(momentum=config.bn_momentum, name=name)(x)

    stem = scaled_filters(RESNET_STAGES[0], config.width)
    x = keras.layers.Activation("relu", name="stem_relu")(
        bn(conv(x, stem, 3, 1, "stem_conv"), "stem_bn")
    )
    for s, filters in enumerate(RESNET_STAGES, start=1):
        n = scaled_filters(filters, config.width)
        for b in range(1, RESNET_BLOCKS + 1):
            stride = 2 if s > 1 and b == 1 else 1
            p = f"stage{s}_block{b}"
            y = conv(x, n, 3, stride, f"{p}_conv1")
            y = keras.layers.Activation("relu", name=f"{p}_relu1")(bn(y, f"{p}_bn1"))
            y = bn(conv(y, n, 3, 1, f"{p}_conv2"), f"{p}_bn2")
            if stride != 1 or x.shape[-1] != n:
                x = bn(conv(x, n, 1, stride, f"{p}_shortcut"), f"{p}_shortcut_bn")
            x = keras.layers.Add(name=f"{p}_add")([x, y])
            x = keras.layers.Activation("relu", name=f"{p}_relu")(x)
    return x


def custom_objects() -> dict[str, object]:
    """cycleprune's serialisable classes, by registered name and by class name."""
    from cycleprune import losses, schedules

    objects: dict[str, object] = {}
    for cls in (
        losses.CategoricalFocalLoss,
        schedules.CyclicalLearningRate,
        schedules.CyclicalMomentum,
        schedules.CyclicalSGD,
    ):
        objects[cls.__name__] = cls
        objects[keras.saving.get_registered_name(cls)] = cls
    return objects


def load_model(path: str | os.PathLike, *, compile: bool = False) -> keras.Model:
    """Load a saved ``.keras`` model without running code from the file.

    A model file may come from anywhere, so loading trusts nothing in it. Only the ``.keras``
    format is accepted: Keras revives ``.h5`` files and SavedModel folders with their ``Lambda``
    layers' Python code even in safe mode. Before Keras sees the file, its ``config.json`` is
    checked (:func:`check_artifact`): no code-carrying layers (``Lambda``, ``TFOpLambda``), and no
    object from a module other than Keras, tfmot or cycleprune, because Keras imports whatever
    module a config names. Then Keras loads it with ``safe_mode=True``, inside tfmot's
    ``prune_scope`` so that models still wrapped for pruning load, and with cycleprune's custom
    objects (focal loss, cyclical schedules, ``CyclicalSGD``), which are also registered for plain
    Keras loading.

    Args:
        path: The saved model.
        compile: Restore the training configuration (loss, optimizer and its state) too.

    Returns:
        The ``keras.Model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but is not a loadable, trusted ``.keras`` model (the
            message names it and, for an untrusted object, where it is in the config).
    """
    import tensorflow_model_optimization as tfmot

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}")
    check_artifact(path)
    objects = custom_objects()
    try:
        with tfmot.sparsity.keras.prune_scope():
            model = keras.models.load_model(
                str(path), compile=compile, safe_mode=True, custom_objects=objects
            )
    except Exception as err:  # Keras raises many types (OSError, zipfile, h5py, ValueError...)
        raise ValueError(
            f"{path} is not a loadable Keras model: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path} is not a Keras model (loaded a {type(model).__name__})")
    return model


# Layers that run Python code or TensorFlow ops named by the file itself.
_CODE_LAYERS = frozenset({"Lambda", "__lambda__", "TFOpLambda", "SlicingOpLambda"})
# Top-level packages a saved object may come from: Keras, tfmot's pruning wrappers, cycleprune.
TRUSTED_MODULES = ("keras", "tf_keras", "tensorflow_model_optimization", "cycleprune")
_MAX_CONFIG_BYTES = 64 * 2**20


def check_artifact(path: str | os.PathLike) -> None:
    """Refuse a model file that could make Keras run code, before Keras reads it.

    Keras' safe mode refuses ``lambda`` code in ``.keras`` files only; it still imports any module
    a config names and calls what it finds there, and ``.h5``/SavedModel loading ignores it. So:
    the file must be a ``.keras`` zip archive whose ``config.json`` (at most 64 MiB) contains no
    ``Lambda``/``TFOpLambda``/``SlicingOpLambda`` layer, names no module outside
    :data:`TRUSTED_MODULES`, and no ``builtins`` function that is a Python built-in (``eval``,
    ``exec``, ``open``...).

    Args:
        path: The model file.

    Raises:
        ValueError: the file is another format, not a readable ``.keras`` archive, or names an
            untrusted object (the message gives the path and where in the config).
    """
    import builtins
    import json
    import zipfile

    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".h5", ".hdf5"):
        kind = "a SavedModel folder" if path.is_dir() else "an HDF5 (.h5) file"
        raise ValueError(
            f"{path} is {kind}: only .keras files are loaded, because Keras runs the Python "
            "code of Lambda layers stored in other formats even in safe mode"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            if info.file_size > _MAX_CONFIG_BYTES:
                raise ValueError(
                    f"{path}: config.json is {info.file_size} bytes, more than the limit of "
                    f"{_MAX_CONFIG_BYTES}"
                )
            config = json.loads(archive.read(info))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a .keras model archive: {err}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: config.json is not valid JSON: {err}") from err

    def refuse(where: str, why: str) -> None:
        raise ValueError(f"{path} is not a trusted model: {where} {why}; refusing to load it")

    def walk(node, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        if "class_name" in node:
            name, module = node["class_name"], node.get("module")
            if isinstance(name, str) and name in _CODE_LAYERS:
                refuse(where, f"is a {name} layer, which runs code stored in the file")
            if module is not None:
                if not isinstance(module, str):
                    refuse(where, f"has a module that is not a string: {module!r}")
                inner = node.get("config")
                if module == "builtins":
                    if name != "function" or not isinstance(inner, str) or hasattr(builtins, inner):
                        refuse(where, f"names the Python built-in {inner!r}")
                elif module.split(".")[0] not in TRUSTED_MODULES:
                    refuse(
                        where,
                        f"names {name!r} from module {module!r} (only "
                        f"{', '.join(TRUSTED_MODULES)} objects are loaded)",
                    )
        for key, value in node.items():
            walk(value, f"{where}.{key}")

    walk(config, "config.json")


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            "Argument `input_shape` must be (height, width, channels) with positive sides. "
            f"Received: input_shape={input_shape!r}"
        )
    return shape  # type: ignore[return-value]


class _SeedSequence:
    """Hands out one distinct seed per layer, so a seeded model is reproducible."""

    def __init__(self, seed: int | None) -> None:
        self._seed = seed
        self._count = 0

    def next(self) -> int | None:
        if self._seed is None:
            return None
        self._count += 1
        return int(self._seed) * 1000 + self._count

    def he_uniform(self):
        seed = self.next()
        return "he_uniform" if seed is None else keras.initializers.HeUniform(seed=seed)

    def glorot_uniform(self):
        seed = self.next()
        return "glorot_uniform" if seed is None else keras.initializers.GlorotUniform(seed=seed)
