"""cycleprune.models: the VGG-style network, its parameter count, seeding and loading."""

from __future__ import annotations

import numpy as np
import pytest

from cycleprune import models
from cycleprune.compat import keras
from cycleprune.config import ModelConfig

TINY = ModelConfig(width=0.125, batch_norm=True)


def _conv_names() -> list[str]:
    return [
        f"block{b}_conv{i}"
        for b, (_, convs) in enumerate(models.VGG_BLOCKS, start=1)
        for i in range(1, convs + 1)
    ]


def test_full_width_parameter_count_matches_the_article():
    model = models.build_model(ModelConfig(width=1.0), (28, 28, 1), 2)
    assert model.count_params() == 14_714_562
    # VGG16's filter plan, layer by layer.
    filters = [model.get_layer(name).filters for name in _conv_names()]
    assert filters == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert model.output_shape == (None, 2)


def test_layer_names_and_structure():
    model = models.build_model(ModelConfig(width=0.125, dropout=0.3), (28, 28, 1), 3)
    names = [layer.name for layer in model.layers]
    assert names[:2] == ["image", "rescale"]
    assert "resize" not in names  # input_size=0: no resize
    assert [n for n in names if n.startswith("block") and n.endswith("_pool")] == [
        f"block{b}_pool" for b in range(1, 5)
    ]
    assert names[-3:] == ["avg_pool", "dropout", "predictions"]
    for name in _conv_names():
        layer = model.get_layer(name)
        assert layer.kernel_size == (3, 3) and layer.padding == "same" and layer.use_bias
    assert model.get_layer("predictions").units == 3


def test_width_rounding_and_batch_norm_drops_conv_bias():
    model = models.build_model(ModelConfig(width=0.01, batch_norm=True), (16, 16, 1), 2)
    # 64 * 0.01 = 0.64 -> 1; 512 * 0.01 = 5.12 -> 5
    assert model.get_layer("block1_conv1").filters == 1
    assert model.get_layer("block5_conv3").filters == 5
    assert models.scaled_filters(256, 0.125) == 32
    for name in _conv_names():
        assert not model.get_layer(name).use_bias
        assert isinstance(
            model.get_layer(name.replace("conv", "bn")), keras.layers.BatchNormalization
        )


def test_rescales_and_resizes_inside_the_model():
    model = models.build_model(ModelConfig(width=0.125, input_size=32), (28, 28, 1), 2)
    assert model.get_layer("resize").output_shape == (None, 32, 32, 1)
    probe = keras.Model(model.input, model.get_layer("rescale").output)
    pixels = np.full((1, 28, 28, 1), 255.0, np.float32)
    np.testing.assert_allclose(probe(pixels).numpy(), 1.0, rtol=1e-6)
    probs = model(pixels).numpy()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
    # Same size as the input: no Resizing layer.
    same = models.build_model(ModelConfig(width=0.125, input_size=28), (28, 28, 1), 2)
    assert "resize" not in [layer.name for layer in same.layers]


def test_seed_makes_initialisation_deterministic():
    first = models.build_model(TINY, (28, 28, 1), 2, seed=7)
    again = models.build_model(TINY, (28, 28, 1), 2, seed=7)
    other = models.build_model(TINY, (28, 28, 1), 2, seed=8)
    for a, b in zip(first.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    kernel = first.get_layer("block1_conv1").kernel.numpy()
    assert not np.array_equal(kernel, other.get_layer("block1_conv1").kernel.numpy())


def test_mixed_precision_keeps_a_float32_output():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_model(ModelConfig(width=0.125), (28, 28, 1), 2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block1_conv1").compute_dtype == "float16"
    assert model.output.dtype == "float32"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (28, 28), "num_classes": 2}, "input_shape"),
        ({"input_shape": (28, 28, 1), "num_classes": 1}, "num_classes=1"),
        ({"input_shape": (8, 8, 1), "num_classes": 2}, "at least 16x16"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(ModelConfig(width=0.125), **kwargs)


def test_save_and_load_roundtrip_with_custom_objects(tmp_path):
    from cycleprune.losses import CategoricalFocalLoss
    from cycleprune.schedules import CyclicalLearningRate

    model = models.build_model(TINY, (28, 28, 1), 2, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(CyclicalLearningRate(1e-3, 1e-1, 4), momentum=0.9),
        loss=CategoricalFocalLoss(gamma=2.0, alpha=0.25),
    )
    x = np.random.default_rng(0).uniform(0, 255, (4, 28, 28, 1)).astype(np.float32)
    y = keras.utils.to_categorical([0, 1, 0, 1], 2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.optimizer is None  # compile=False

    compiled = models.load_model(path, compile=True)
    assert isinstance(compiled.loss, CategoricalFocalLoss) and compiled.loss.alpha == 0.25
    assert isinstance(compiled.optimizer.get_config()["learning_rate"], dict)
    # Registered: plain Keras loading works too.
    plain = keras.models.load_model(path)
    assert isinstance(plain.loss, CategoricalFocalLoss)


def test_load_model_loads_pruning_wrapped_models(tmp_path):
    import tensorflow_model_optimization as tfmot

    model = models.build_model(ModelConfig(width=0.125), (28, 28, 1), 2, seed=0)
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0)

    # tfmot cannot wrap Rescaling/Resizing, so the weighted layers are wrapped one by one.
    def wrap(layer):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned = keras.models.clone_model(model, clone_function=wrap)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    with pytest.raises(
        (TypeError, ValueError)
    ):  # without tfmot's scope Keras does not know the wrapper
        keras.models.load_model(path)
    loaded = models.load_model(path)
    wrapped = [layer.name for layer in loaded.layers if type(layer).__name__ == "PruneLowMagnitude"]
    assert len(wrapped) == 14  # 13 convolutions + the classifier


def test_load_model_errors_name_the_path(tmp_path):
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.keras"):
        models.load_model(junk)
    with pytest.raises(FileNotFoundError, match=r"missing\.keras"):
        models.load_model(tmp_path / "missing.keras")


def test_batchnorm_momentum_comes_from_the_config():
    model = models.build_model(
        ModelConfig(width=0.125, batch_norm=True, bn_momentum=0.9), (28, 28, 1), 2, seed=0
    )
    norms = [layer for layer in model.layers if layer.name.endswith("_bn1")]
    assert norms and {layer.momentum for layer in norms} == {0.9}
    with pytest.raises(ValueError, match=r"model\.bn_momentum"):
        ModelConfig(bn_momentum=1.0)


RESNET = ModelConfig(arch="resnet", width=0.125, batch_norm=True)


def _trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet_is_resnet18_for_small_images():
    # ResNet-18 in its CIFAR form (3x3 stem, no max pool) has 11,173,962 trainable parameters
    # for 32x32x3 images and 10 classes (He et al. 2016; the common PyTorch port's count).
    full = ModelConfig(arch="resnet", width=1.0, batch_norm=True)
    assert _trainable(models.build_model(full, (32, 32, 3), 10)) == 11_173_962
    model = models.build_model(full, (28, 28, 1), 2)
    assert model.count_params() == 11_178_306 and model.name == "resnet"
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 4 * 2 * 2 + 3  # stem, two per block, three 1x1 shortcuts
    assert all(not layer.use_bias for layer in convs)
    assert [model.get_layer(f"stage{s}_block1_conv1").strides for s in (1, 2, 3, 4)] == [
        (1, 1),
        (2, 2),
        (2, 2),
        (2, 2),
    ]
    assert [f"stage{s}_block1_shortcut" in {c.name for c in convs} for s in (1, 2, 3, 4)] == [
        False,
        True,
        True,
        True,
    ]
    # 28 -> 28 -> 14 -> 7 -> 4 pixels per side through the stages.
    assert model.get_layer("stage4_block2_relu").output.shape[1:3] == (4, 4)
    assert [layer.name for layer in model.layers][-2:] == ["avg_pool", "predictions"]


def test_resnet_width_seed_and_errors():
    a = models.build_model(RESNET, (28, 28, 1), 2, seed=3)
    b = models.build_model(RESNET, (28, 28, 1), 2, seed=3)
    c = models.build_model(RESNET, (28, 28, 1), 2, seed=4)
    assert (
        a.get_layer("stem_conv").filters == 8 and a.get_layer("stage4_block2_conv2").filters == 64
    )
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.get_layer("stem_conv").kernel, c.get_layer("stem_conv").kernel)
    x = np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)).astype(np.float32)
    np.testing.assert_allclose(a.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-5)
    # Any side works (no pooling to run out of pixels).
    assert models.build_model(RESNET, (8, 8, 1), 2).output_shape == (None, 2)
    with pytest.raises(ValueError, match=r"model\.batch_norm must be true with model\.arch=resnet"):
        ModelConfig(arch="resnet", batch_norm=False)
    with pytest.raises(ValueError, match=r"model\.arch must be one of vgg, resnet"):
        ModelConfig(arch="mobilenet")
