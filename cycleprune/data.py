"""Prepared datasets: sources in, TFRecord shards + ``dataset.json`` out, ``tf.data`` pipelines.

A *source* is one of

- a MedMNIST-style ``.npz`` with ``{train,val,test}_{images,labels}`` arrays (``val`` optional);
- an image folder tree ``<root>/<split>/<CLASS_NAME>/*.{png,jpg,jpeg}`` (the Kaggle
  ``chest_xray`` layout; ``val`` optional, ``train`` and ``test`` required);
- a dataset already prepared by :func:`prepare_dataset` (a folder with ``dataset.json``).

:func:`prepare_dataset` validates the source, converts every image to ``config.channels`` and
``config.image_size``, and writes raw uint8 pixels to ``<split>-00000-of-0000N.tfrecord`` shards
plus ``dataset.json`` (a :class:`DatasetInfo`). Folder sources are streamed one image at a time.
The output folder is built with :func:`cycleprune.storage.atomic_dir`, ``dataset.json`` last, so a
failure leaves no output at all.

:func:`make_dataset` turns a prepared split into batches of float32 images with values 0..255
(models rescale inside) and one-hot float32 labels.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import storage
from cycleprune.config import MAX_PIXELS, DataConfig

SPLITS = ("train", "val", "test")
# Batches a training or evaluation pipeline prepares ahead of the step (see pipeline_options).
PREFETCH_BATCHES = 2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
INFO_FILE = "dataset.json"
_MAX_LABEL = 2**31 - 1
_UNSUPPORTED_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DataError(ValueError):
    """The data is unusable; the message names the file, split, key or value at fault."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` holds about a prepared dataset.

    Attributes:
        class_names: Name of each class index.
        counts: ``{split: {class_name: images}}`` for ``train``, ``val`` and ``test``.
        image_shape: ``(height, width, channels)`` of every stored image.
        source: The source path as given to :func:`prepare_dataset`.
        content_hash: sha256 (hex) over the class names and every shard's name and bytes; the
            same source and config give the same hash.
        created: Creation time, ISO 8601 in UTC.
        shards: ``{split: [shard file names relative to the dataset folder]}``.
        version: The first 12 hex digits of ``content_hash``.
    """

    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    image_shape: tuple[int, int, int]
    source: str
    content_hash: str
    created: str
    shards: dict[str, list[str]]
    version: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        """Images in ``split``.

        Raises:
            ValueError: ``split`` is not in the dataset.
        """
        _check_split(self, split)
        return sum(self.counts[split].values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "counts": {s: dict(c) for s, c in self.counts.items()},
            "image_shape": list(self.image_shape),
            "source": self.source,
            "content_hash": self.content_hash,
            "created": self.created,
            "shards": {s: list(names) for s, names in self.shards.items()},
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetInfo:
        """Build from :meth:`to_dict` output.

        Raises:
            DataError: a key is missing or a value has the wrong form.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise DataError(f"{INFO_FILE} is missing key(s): {', '.join(missing)}")
        try:
            info = cls(
                class_names=tuple(str(n) for n in data["class_names"]),
                counts={
                    str(s): {str(k): int(v) for k, v in c.items()}
                    for s, c in data["counts"].items()
                },
                image_shape=tuple(int(v) for v in data["image_shape"]),
                source=str(data["source"]),
                content_hash=str(data["content_hash"]),
                created=str(data["created"]),
                shards={str(s): [str(n) for n in v] for s, v in data["shards"].items()},
                version=str(data["version"]),
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{INFO_FILE} has a malformed value: {err}") from err
        if len(info.image_shape) != 3 or min(info.image_shape) < 1:
            raise DataError(
                f"{INFO_FILE} image_shape must be [height, width, channels] >= 1. "
                f"Received: image_shape={list(info.image_shape)}"
            )
        if set(info.counts) != set(info.shards):
            raise DataError(
                f"{INFO_FILE} counts and shards name different splits: "
                f"{sorted(info.counts)} vs {sorted(info.shards)}"
            )
        return info


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.counts:
        raise ValueError(
            f"Argument `split` must be one of {', '.join(info.counts)}. Received: split={split!r}"
        )


# --------------------------------------------------------------------------------------------
# Reading prepared datasets


def _holds(out_dir: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether the local folder ``out_dir`` is the local ``source`` or holds it."""
    if storage.is_gcs(source) or not Path(source).exists():
        return False
    out, src = storage.local_path(out_dir).resolve(), Path(source).resolve()
    return out == src or out in src.parents


def load_info(dataset_dir: str | os.PathLike, *, verify: bool = False) -> DatasetInfo:
    """Read ``dataset.json`` of a prepared dataset and check that its shards exist.

    Args:
        dataset_dir: Folder written by :func:`prepare_dataset`.
        verify: Also check the shards' bytes against the recorded ``content_hash`` (one read of
            the dataset), so a corrupted or altered shard is named before any stage trains on
            it, not found mid-epoch as a TensorFlow ``DataLossError``.

    Returns:
        The :class:`DatasetInfo`.

    Raises:
        DataError: the folder has no (valid) ``dataset.json``, a listed shard is missing, or
            (``verify``) the shards do not match the ``content_hash``.
    """
    try:
        folder = storage.local_path(dataset_dir)
    except ValueError as err:
        raise DataError(f"A prepared dataset: {err}") from None
    path = folder / INFO_FILE
    if not path.is_file():
        raise DataError(f"Not a prepared dataset: {folder} has no {INFO_FILE}")
    try:
        raw = storage.read_json(path)
    except ValueError as err:
        raise DataError(str(err)) from err
    if not isinstance(raw, Mapping):
        raise DataError(f"{path} must hold a JSON object")
    info = DatasetInfo.from_dict(raw)
    for split, names in info.shards.items():
        for name in names:
            if Path(name).name != name or not (folder / name).is_file():
                raise DataError(f"{path}: shard {name!r} of split {split!r} is missing")
    if verify and _content_hash(folder, info.class_names, info.shards) != info.content_hash:
        raise DataError(
            f"Prepared dataset {folder} does not match its content_hash: a shard is corrupt or "
            f"changed after {INFO_FILE} was written; prepare it again"
        )
    return info


def _shard_paths(dataset_dir: str | os.PathLike, info: DatasetInfo, split: str) -> list[str]:
    _check_split(info, split)
    return [os.fspath(Path(dataset_dir) / name) for name in info.shards[split]]


def _parse_fn(tf: Any, shape: tuple[int, int, int] | None):
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "channels": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(record):
        f = tf.io.parse_single_example(record, spec)
        pixels = tf.io.decode_raw(f["image"], tf.uint8)
        if shape is None:
            image = tf.reshape(pixels, tf.stack([f["height"], f["width"], f["channels"]]))
        else:
            image = tf.reshape(pixels, shape)
        return image, f["label"]

    return parse


def load_arrays(dataset_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of a prepared split, in file order.

    This is also the order of ``make_dataset(..., training=False)``.

    Args:
        dataset_dir: Folder written by :func:`prepare_dataset`.
        split: ``train``, ``val`` or ``test``.

    Returns:
        ``(images, labels)``: uint8 ``[N, H, W, C]`` and int64 ``[N]``.

    Raises:
        DataError: not a prepared dataset.
        ValueError: unknown ``split``.
    """
    from cycleprune.compat import tf

    info = load_info(dataset_dir)
    files = _shard_paths(dataset_dir, info, split)
    ds = tf.data.TFRecordDataset(files).map(_parse_fn(tf, info.image_shape)).batch(4096)
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
        images.append(x)
        labels.append(y)
    return (
        np.concatenate(images).astype(np.uint8, copy=False),
        np.concatenate(labels).astype(np.int64, copy=False),
    )


def make_dataset(
    dataset_dir: str | os.PathLike,
    split: str,
    config: DataConfig,
    *,
    training: bool,
    class_weight: Mapping[int, float] | None = None,
    records: Any = None,
):
    """A batched ``tf.data`` pipeline over a prepared split.

    Records are parsed in parallel (training reads the shards through a parallel, seeded,
    deterministic interleave; evaluation reads them in file order, the order of
    :func:`load_arrays`). Decoded uint8 images are cached in memory when the split's pixels
    (``N * H * W * C`` bytes, from ``dataset.json``) fit ``config.cache_max_mb``. Training data is
    shuffled (seeded, reshuffled every epoch), then batched (the last batch may be smaller), and
    when ``config.augment`` is on, whole batches are augmented with Keras preprocessing layers
    (random translation, rotation, zoom and, with ``config.flip``, horizontal flip; edges filled
    with the nearest pixel so that no artificial black border appears; then, with
    ``config.contrast``, a random contrast change per image). The augmentation runs
    sequentially over batches so that a seed gives the same augmented stream.

    Args:
        dataset_dir: Folder written by :func:`prepare_dataset`.
        split: ``train``, ``val`` or ``test``.
        config: Batch size, shuffle, cache and augmentation settings.
        training: Shuffle and augment (augmentation also needs ``config.augment``).
        class_weight: ``{class index: weight}`` for every class; when given, each element
            also carries per-image sample weights ``w = class_weight[label]``.
        records: The split's decoded records from :func:`cached_records`, to build on instead
            of reading the shards (one pipeline per epoch then shares one in-memory cache).

    Returns:
        A dataset of ``(images, labels)`` or ``(images, labels, weights)``: float32
        ``[B, H, W, C]`` with values in 0..255, one-hot float32 ``[B, K]``, float32 ``[B]``.

    Raises:
        DataError: not a prepared dataset.
        ValueError: unknown ``split``, or ``class_weight`` does not cover every class.
    """
    from cycleprune.compat import keras, tf

    info = load_info(dataset_dir)
    files = _shard_paths(dataset_dir, info, split)
    k = info.num_classes
    weights = None
    if class_weight is not None:
        lookup = {int(c): float(w) for c, w in class_weight.items()}
        if sorted(lookup) != list(range(k)):
            raise ValueError(
                f"Argument `class_weight` must have one weight per class 0..{k - 1}. "
                f"Received: class_weight={dict(class_weight)!r}"
            )
        weights = tf.constant([lookup[c] for c in range(k)], tf.float32)
    auto = tf.data.AUTOTUNE
    seed = config.seed
    if records is not None:
        ds = records
    elif training:
        ds = tf.data.Dataset.from_tensor_slices(files)
        if len(files) > 1:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(len(files), 8),
            num_parallel_calls=auto,
            deterministic=True,
        )
    else:
        ds = tf.data.TFRecordDataset(files)
    if records is None:
        ds = ds.map(_parse_fn(tf, info.image_shape), num_parallel_calls=auto, deterministic=True)
        if _fits_cache(info, split, config):
            ds = ds.cache()
    if training:
        ds = ds.shuffle(
            min(config.shuffle_buffer, info.num_examples(split)),
            seed=seed,
            reshuffle_each_iteration=True,
        )
    ds = ds.batch(config.batch_size, drop_remainder=False)

    def to_float(images, labels):
        return tf.cast(images, tf.float32), labels

    ds = ds.map(to_float, num_parallel_calls=auto, deterministic=True)
    augment = _augmenter(keras, tf, config, info.image_shape) if training else None
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y))

    def finish(images, labels):
        onehot = tf.one_hot(labels, depth=k, dtype=tf.float32)
        if weights is None:
            return images, onehot
        return images, onehot, tf.gather(weights, labels)

    ds = ds.map(finish, num_parallel_calls=auto, deterministic=True)
    # A known length: Keras `fit` otherwise counts one extra optimizer step per epoch on a
    # dataset of unknown cardinality, which would shift every step-based schedule.
    batches = -(-info.num_examples(split) // config.batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds.prefetch(PREFETCH_BATCHES).with_options(pipeline_options(tf))


def pipeline_options(tf: Any) -> Any:
    """``tf.data.Options`` of every batch pipeline: autotuning off.

    Training drops two pipelines per epoch (``fit``'s and the validation ``evaluate``'s). When
    an autotuned pipeline is dropped, TensorFlow waits for its autotuning thread's next wake-up,
    and those come at doubling intervals (about 0.3, 0.6, 1.3, 2.6, 5.1 s... after the start),
    so ``fit`` returned up to 4.8 s after its last step, at random: on the ``small`` preset,
    8 epochs took 48-50 s with autotuning and 42-44 s without, with no slower steps. Without the
    autotuner, ``AUTOTUNE`` parallel maps run ``min(16, CPU threads)`` calls at once, and the
    prefetch buffer holds :data:`PREFETCH_BATCHES` batches.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def cached_records(dataset_dir: str | os.PathLike, split: str, config: DataConfig) -> Any:
    """The split's decoded ``(uint8 image, label)`` records, in file order, cached in memory.

    Build it once and pass it to every :func:`make_dataset` call of a run (``records=``): the
    shards are read and parsed during the first pass only, and each later pipeline (one per
    epoch, each with its own shuffle seed) starts from memory. Returns ``None`` when that would
    change the data: the split does not fit ``config.cache_max_mb`` (or caching is off), or the
    shuffle buffer does not cover the whole split (then the per-epoch file shuffle matters).
    The stream of an epoch depends only on that epoch's seed, not on which epoch filled the
    cache, so a resumed run sees the same batches as an uninterrupted one.
    """
    from cycleprune.compat import tf

    info = load_info(dataset_dir)
    files = _shard_paths(dataset_dir, info, split)
    if not _fits_cache(info, split, config) or config.shuffle_buffer < info.num_examples(split):
        return None
    parse = _parse_fn(tf, info.image_shape)
    auto = tf.data.AUTOTUNE
    ds = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=auto, deterministic=True)
    return ds.cache()


def _fits_cache(info: DatasetInfo, split: str, config: DataConfig) -> bool:
    pixels = info.num_examples(split) * int(np.prod(info.image_shape))  # uint8: one byte each
    return config.cache and pixels <= config.cache_max_mb * 2**20


def _augmenter(keras: Any, tf: Any, config: DataConfig, shape: tuple[int, int, int]):
    if not config.augment:
        return None
    layers = []
    # float32 whatever the global policy: under mixed_float16 (training on a GPU, see
    # cycleprune.precision) the layers would otherwise hand float16 images to the pipeline.
    common = {"fill_mode": "nearest", "interpolation": "bilinear", "dtype": "float32"}
    if config.translate:
        layers.append(
            keras.layers.RandomTranslation(
                config.translate, config.translate, seed=config.seed + 1, **common
            )
        )
    if config.rotate:
        layers.append(keras.layers.RandomRotation(config.rotate, seed=config.seed + 2, **common))
    if config.zoom:
        layers.append(
            keras.layers.RandomZoom(config.zoom, config.zoom, seed=config.seed + 3, **common)
        )
    if config.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=config.seed + 4, dtype="float32"))
    if config.contrast:
        layers.append(_per_image_contrast(tf, config.contrast, config.seed + 5))
    if not layers:
        return None
    # The layers create their random generators (tf.Variables) on the first call; that must
    # happen eagerly, not while tf.data traces the map function.
    probe = tf.zeros((1, *shape), tf.float32)
    for layer in layers:
        layer(probe, training=True)

    def augment(images):
        for layer in layers:
            images = layer(images, training=True)
        # Bilinear sampling stays within the input range up to rounding; keep the 0..255 promise.
        return tf.clip_by_value(images, 0.0, 255.0)

    return augment


def _per_image_contrast(tf: Any, factor: float, seed: int):
    """Scale each image's deviation from its own mean by a factor from ``[1 - f, 1 + f]``.

    ``keras.layers.RandomContrast`` draws one factor per batch; this draws one per image.
    Called like a Keras layer (``training`` is accepted and ignored).
    """
    generator = tf.random.Generator.from_seed(seed)

    def contrast(images, training=True):
        del training
        n = tf.shape(images)[0]
        scale = tf.cast(generator.uniform([n, 1, 1, 1], 1.0 - factor, 1.0 + factor), images.dtype)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        return (images - mean) * scale + mean

    return contrast


def class_weights(info: DatasetInfo, config: DataConfig) -> dict[int, float] | None:
    """Per-class loss weights from ``config.class_weight``.

    ``"balanced"`` gives ``w_c = n / (k * n_c)`` from the training counts (n images, k classes,
    n_c images of class c; as scikit-learn's ``compute_class_weight("balanced")``), so every class
    contributes the same total weight. ``"none"`` gives ``None``. A list gives ``{i: w_i}``.

    Args:
        info: The prepared dataset.
        config: Holds ``class_weight``.

    Returns:
        ``{class index: weight}`` or ``None``.

    Raises:
        ValueError: a weight list whose length is not the number of classes.
        DataError: ``"balanced"`` with a class that has no training images.
    """
    spec = config.class_weight
    k = info.num_classes
    if spec == "none":
        return None
    if spec == "balanced":
        _check_split(info, "train")
        counts = [info.counts["train"].get(name, 0) for name in info.class_names]
        total = sum(counts)
        for name, n_c in zip(info.class_names, counts, strict=True):
            if n_c == 0:
                raise DataError(f"Class {name!r} has no training images: cannot balance weights")
        return {i: total / (k * n_c) for i, n_c in enumerate(counts)}
    if len(spec) != k:
        raise ValueError(
            f"data.class_weight must hold one weight per class ({k}: "
            f"{', '.join(info.class_names)}). Received: data.class_weight={spec!r}"
        )
    return {i: float(w) for i, w in enumerate(spec)}


# --------------------------------------------------------------------------------------------
# Sources. Each split of a source is a label array plus a reader that yields the converted
# images of selected (ascending) indices one at a time, so that folders are streamed.

Reader = Callable[[np.ndarray], Iterator[tuple[np.ndarray, str]]]


@dataclasses.dataclass(frozen=True)
class _Split:
    labels: np.ndarray  # int64, one per source item, in source order
    read: Reader
    where: str  # what to name in messages about the split as a whole


def prepare_dataset(
    source: str | os.PathLike, out_dir: str | os.PathLike, config: DataConfig
) -> DatasetInfo:
    """Validate a source and write it as a prepared dataset.

    Steps: read and check the source; carve a seeded, stratified validation split from train
    when the source has none (``config.val_fraction`` of each class, at least one image); keep at
    most ``config.limit`` images per split (stratified, seeded; every class kept when the limit
    allows); convert each image to ``config.channels`` (Pillow ``"L"``/``"RGB"``) and, when
    ``config.image_size > 0``, resize it to a square of that side (bilinear); write shards of
    ``config.shard_size`` images and ``dataset.json``. ``.npz`` splits keep their order; image
    folders are written in a seeded random order (their listing is sorted by class).

    Args:
        source: A ``.npz`` file, an image folder tree, or a prepared dataset folder.
        out_dir: Output folder: new, empty, or a prepared dataset (``dataset.json``), which is
            replaced as a whole; left untouched on failure. It may not hold the source.
        config: Conversion, split, limit and shard settings.

    Returns:
        The :class:`DatasetInfo` written to ``out_dir/dataset.json``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataError: the source is not usable (the message names the file, key or split).
    """
    if _holds(out_dir, source):
        raise DataError(
            f"Output folder {out_dir} holds the source {source}: replacing it would delete the "
            f"source; write the prepared dataset to another folder"
        )
    storage.check_output_dir(out_dir, replaces=INFO_FILE)
    path = Path(source)
    if storage.is_gcs(source):
        class_names, splits = _open_gcs(str(source), config)
    elif not path.exists():
        raise FileNotFoundError(f"Data source not found: {path}")
    elif path.is_dir():
        if (path / INFO_FILE).exists():
            class_names, splits = _open_prepared(path, config)
        else:
            class_names, splits = _open_folder(path, config)
    elif path.suffix.lower() == ".npz":
        class_names, splits = _open_npz(path, config)
    else:
        raise DataError(
            f"Unsupported data source {path}: expected a .npz file, an image folder "
            f"(<root>/<split>/<class>/*.png|jpg) or a prepared dataset folder"
        )
    plan = _plan(class_names, splits, config)
    with storage.atomic_dir(out_dir, replaces=INFO_FILE) as tmp:
        shards, shape = _write(tmp, plan, config)
        counts = {
            split: {name: int(np.sum(labels == i)) for i, name in enumerate(class_names)}
            for split, (_, _, labels) in plan.items()
        }
        digest = _content_hash(tmp, class_names, shards)
        info = DatasetInfo(
            class_names=tuple(class_names),
            counts=counts,
            image_shape=shape,
            source=os.fspath(source),
            content_hash=digest,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            shards=shards,
            version=digest[:12],
        )
        storage.atomic_write_json(tmp / INFO_FILE, info.to_dict())
    return info


def _plan(
    class_names: list[str], splits: dict[str, _Split], config: DataConfig
) -> dict[str, tuple[_Split, np.ndarray, np.ndarray]]:
    """Per split: (source split, selected ascending indices, their labels)."""
    if len(class_names) < 2:
        raise DataError(
            f"Need at least 2 classes, found {len(class_names)} in {splits['train'].where}: "
            f"{class_names}"
        )
    for split, part in splits.items():
        if len(part.labels) == 0:
            raise DataError(f"Split {split!r} is empty ({part.where})")
    # Every class in every split: training needs each class, the threshold and selection need
    # both sides in validation, and test metrics (sensitivity, AUC) are undefined without them.
    for split, part in splits.items():
        present = np.bincount(part.labels, minlength=len(class_names))
        for i, name in enumerate(class_names):
            if present[i] == 0:
                raise DataError(
                    f"Class {name!r} (label {i}) has no images in split {split!r} ({part.where})"
                )
    train = splits["train"]
    selected = {split: np.arange(len(part.labels)) for split, part in splits.items()}
    if "val" not in splits:
        keep, val = _carve(train.labels, config.val_fraction, config.seed, class_names, train.where)
        selected["train"], selected["val"] = keep, val
        splits = {**splits, "val": train}
    plan = {}
    for index, split in enumerate(SPLITS):
        part, idx = splits[split], selected[split]
        if config.limit and len(idx) > config.limit:
            rng = _rng(config.seed, 2, index)
            idx = idx[_stratified(part.labels[idx], config.limit, rng)]
            if len(np.unique(part.labels[idx])) < len(class_names):
                raise DataError(
                    f"data.limit={config.limit} keeps fewer than one image of each of the "
                    f"{len(class_names)} classes in split {split!r} ({part.where}): set "
                    f"data.limit >= {len(class_names)} or 0 (all)"
                )
        plan[split] = (part, idx, part.labels[idx])
    return plan


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent stream per purpose (carve, limit, folder order) and split.
    return np.random.default_rng([seed % 2**32, *stream])


def _carve(
    labels: np.ndarray, fraction: float, seed: int, class_names: list[str], where: str
) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed, 1)
    val = []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise DataError(
                f"Class {name!r} has {len(idx)} training image(s) in {where}: at "
                f"least 2 are needed to carve a validation split"
            )
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(rng.choice(idx, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val))
    keep = np.setdiff1d(np.arange(len(labels)), val_idx)
    return keep, val_idx


def _stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Ascending positions of ``n`` labels, class shares kept (largest remainder, >= 1 each)."""
    classes, counts = np.unique(labels, return_counts=True)
    base = np.minimum(counts, 1) if n >= len(classes) else np.zeros_like(counts)
    rest = n - int(base.sum())
    room = counts - base
    exact = room * rest / room.sum()
    extra = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - extra), kind="stable")[: rest - int(extra.sum())]:
        extra[i] += 1
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
        for c, q in zip(classes, base + extra, strict=True)
        if q
    ]
    return np.sort(np.concatenate(picks))


# ---- .npz


def _open_npz(
    file: Path, config: DataConfig, name: str | None = None
) -> tuple[list[str], dict[str, _Split]]:
    # Messages, and the splits' names in later ones, say `name` (a gs:// URI whose download is
    # gone by then), else the file's path.
    path = name or file
    # numpy calls anything that is neither a zip nor a .npy "pickled (object) data" and suggests
    # allow_pickle: say what the file is instead.
    try:
        with open(file, "rb") as handle:
            head = handle.read(6)
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err}") from err
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        what = (
            "a Python pickle (never loaded: it could run code)"
            if head[:1] == b"\x80"
            else (f"not a .npz archive (a zip of .npy arrays): its first bytes are {head!r}")
        )
        raise DataError(f"{path} is {what}")
    try:
        archive = np.load(file, allow_pickle=False)
    except _NPZ_ERRORS as err:
        raise DataError(f"Cannot read {path} as a .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not a .npz archive of named arrays")
    with archive:
        keys = set(archive.files)
        arrays = {}
        for split in SPLITS:
            wanted = (f"{split}_images", f"{split}_labels")
            if split == "val" and not any(k in keys for k in wanted):
                continue
            for key in wanted:
                if key not in keys:
                    raise DataError(f"{path} has no array {key!r} (keys: {sorted(keys)})")
                arrays[key] = _npz_array(archive, key, path, images=key.endswith("_images"))
        names_array = _npz_array(archive, "class_names", path) if "class_names" in keys else None
    splits_found = [s for s in SPLITS if f"{s}_images" in arrays]
    labels = {}
    for split in splits_found:
        images = arrays[f"{split}_images"] = _check_images(
            arrays[f"{split}_images"], f"{split}_images", path
        )
        labels[split] = _check_labels(arrays[f"{split}_labels"], f"{split}_labels", path)
        if len(images) != len(labels[split]):
            raise DataError(
                f"{path}: {split}_images has {len(images)} images but "
                f"{split}_labels has {len(labels[split])} labels"
            )
    top = max((int(v.max()) for v in labels.values() if len(v)), default=0)
    if names_array is not None:
        if names_array.ndim != 1 or names_array.dtype.kind not in "US":
            raise DataError(
                f"{path}: 'class_names' must be a 1-D string array. Received: dtype="
                f"{names_array.dtype}, shape={names_array.shape}"
            )
        try:
            class_names = [v.decode() if isinstance(v, bytes) else str(v) for v in names_array]
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: 'class_names' is not valid UTF-8: {err}") from err
        if len(set(class_names)) != len(class_names) or not all(n.strip() for n in class_names):
            raise DataError(
                f"{path}: 'class_names' must hold distinct non-empty names. "
                f"Received: {class_names[:20]}"
            )
        origin = f"{path} 'class_names'"
        # Names given twice must agree: otherwise one of them labels the classes wrongly (the
        # KFP form's default, [normal, pneumonia], would rename any file's classes).
        if config.class_names and list(config.class_names) != class_names:
            raise DataError(
                f"{path} names its classes {class_names}, but data.class_names is "
                f"{list(config.class_names)}: set data.class_names to the file's names or to [] "
                f"(the file's)"
            )
    elif config.class_names:
        class_names = list(config.class_names)
        origin = "data.class_names"
    else:
        n_train = len(labels["train"])
        if n_train and top >= n_train:  # every class needs a training image; bounds the names
            raise DataError(
                f"{path}: label {top} means {top + 1} classes, but train_labels has only "
                f"{n_train} labels (every class needs training images); name the classes "
                f"with data.class_names, or fix the labels"
            )
        class_names = [f"class_{i}" for i in range(top + 1)]
        origin = ""
    if origin and top >= len(class_names):
        raise DataError(
            f"{path}: label {top} is out of range for the {len(class_names)} class "
            f"names of {origin}: {class_names}"
        )
    splits = {}
    for split in splits_found:
        images = arrays[f"{split}_images"]
        key = f"{split}_images"
        splits[split] = _Split(
            labels[split], _array_reader(images, config, f"{path} {key}"), f"{path} {key}"
        )
    return class_names, splits


# What numpy and zipfile raise for a damaged archive or array (zlib.error: corrupt deflate data;
# NotImplementedError: an unsupported zip compression method).
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


def _npz_array(archive: Any, key: str, path: Path, *, images: bool = False) -> np.ndarray:
    """One array of an open ``.npz``; its header is checked before any data is read."""
    try:
        with archive.zip.open(f"{key}.npy") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header_bytes = handle.tell()
        size = archive.zip.getinfo(f"{key}.npy").file_size
    except KeyError as err:
        raise DataError(f"{path}: {key!r} is not a .npy array") from err
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: array {key!r} is corrupt: {err}") from err
    if dtype.hasobject:  # object arrays (ragged images, Python objects) need pickle
        raise DataError(
            f"{path}: array {key!r} cannot be loaded without pickle (an object "
            f"array, e.g. images of mixed sizes; dtype {dtype})"
        )
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > size - header_bytes:  # a header that promises more data than the file holds
        raise DataError(
            f"{path}: array {key!r} is corrupt: its header declares shape {shape} "
            f"({declared} bytes) but the file holds {size - header_bytes} bytes of data"
        )
    if images and len(shape) >= 3 and shape[1] * shape[2] > MAX_PIXELS:
        raise DataError(
            f"{path}: {key} has images of {shape[1]}x{shape[2]} pixels, more than the "
            f"limit of {MAX_PIXELS}"
        )
    try:
        array = archive[key]
    except _NPZ_ERRORS as err:
        raise DataError(f"{path}: array {key!r} is corrupt: {err}") from err
    if not isinstance(array, np.ndarray):  # pragma: no cover - numpy returns arrays for .npy
        raise DataError(f"{path}: {key!r} is not a .npy array")
    return array


def _check_images(images: np.ndarray, key: str, path: Path) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4) or 0 in images.shape[1:3]:
        raise DataError(
            f"{path}: {key} must have shape (N, H, W) or (N, H, W, C) with C in "
            f"1..4. Received: shape={images.shape}"
        )
    kind = images.dtype.kind
    if kind == "f" and np.isnan(images).any():
        raise DataError(f"{path}: {key} contains NaN (dtype {images.dtype})")
    if kind not in "iu":
        raise DataError(
            f"{path}: {key} must hold uint8 pixels (or integers in 0..255). "
            f"Received: dtype={images.dtype}"
        )
    if images.dtype != np.uint8:
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if low < 0 or high > 255:
            raise DataError(
                f"{path}: {key} values must be in 0..255. Received: dtype="
                f"{images.dtype}, min={low}, max={high}"
            )
        images = images.astype(np.uint8)
    return images


def _check_labels(labels: np.ndarray, key: str, path: Path) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {key} must have shape (N,) or (N, 1). Received: shape={labels.shape}"
        )
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise DataError(f"{path}: {key} contains NaN at index {int(np.argmax(np.isnan(labels)))}")
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{path}: {key} must hold integer class indices. Received: dtype={labels.dtype}"
        )
    if len(labels):
        bad = np.flatnonzero((labels < 0) | (labels > _MAX_LABEL))
        if len(bad):
            raise DataError(
                f"{path}: {key}[{bad[0]}] = {labels[bad[0]]} is not a class index "
                f"(must be in 0..{_MAX_LABEL})"
            )
    return labels.astype(np.int64)


def _array_reader(images: np.ndarray, config: DataConfig, where: str) -> Reader:
    def read(indices: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
        for i in indices:
            name = f"{where}[{i}]"
            yield _convert_array(images[i], config, name), name

    return read


# ---- image folders


def _open_folder(root: Path, config: DataConfig) -> tuple[list[str], dict[str, _Split]]:
    real_root = os.path.realpath(root)
    files: dict[str, dict[str, list[Path]]] = {}
    for entry in _entries(root, real_root):
        if entry.is_dir():
            if entry.name not in SPLITS:
                raise DataError(f"Unknown split folder {entry}: expected train, val or test")
            files[entry.name] = _class_files(entry, real_root)
        # Other files at the top (README, LICENSE) are not part of the data.
    return _folder_splits(str(root), files, config, _file_reader)


def _folder_splits(
    root: str,
    files: Mapping[str, Mapping[str, list[Any]]],
    config: DataConfig,
    reader: Callable[[list[Any], DataConfig], Reader],
) -> tuple[list[str], dict[str, _Split]]:
    """Check an image tree's ``{split: {class: [files]}}`` (local paths or ``gs://`` URIs);
    per split: every file of every class, in a seeded random order, with its label."""
    for split in ("train", "test"):
        if split not in files:
            why = " (evaluation needs a held-out test split)" if split == "test" else ""
            raise DataError(
                f"Image folder {root} has no {split!r} split folder{why}; expected "
                f"{root}/<train|val|test>/<class>/*.png|jpg"
            )
    class_names = sorted(files["train"])
    for split, by_class in files.items():
        if sorted(by_class) != class_names:
            missing = sorted(set(class_names) - set(by_class))
            extra = sorted(set(by_class) - set(class_names))
            raise DataError(
                f"Split folder {root}/{split} has different classes than "
                f"{root}/train: missing {missing}, extra {extra}"
            )
    splits = {}
    for index, split in enumerate(SPLITS):
        if split not in files:
            continue
        items = [(p, c) for c, name in enumerate(class_names) for p in files[split][name]]
        order = _rng(config.seed, 3, index).permutation(len(items))
        paths = [items[i][0] for i in order]
        labels = np.array([items[i][1] for i in order], dtype=np.int64)
        splits[split] = _Split(labels, reader(paths, config), f"{root}/{split}")
    return class_names, splits


def _entries(folder: Path, real_root: str) -> list[Path]:
    """Visible entries of ``folder``, sorted; symlinks must stay inside the root."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = folder / name
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            # os.listdir keeps undecodable bytes as surrogates; later writes (JSON, HTML) fail.
            raise DataError(
                f"{os.fsencode(path)!r} is not a UTF-8 name: rename it (an archive unpacked "
                f"with another encoding?)"
            ) from None
        if path.is_symlink():
            target = os.path.realpath(path)
            if os.path.commonpath([target, real_root]) != real_root:
                raise DataError(
                    f"Symlink {path} points outside the data folder {real_root}: {target}"
                )
        if not (path.is_dir() or path.is_file()):
            raise DataError(f"{path} is neither a file nor a folder (broken link?)")
        out.append(path)
    return out


def _class_files(split_dir: Path, real_root: str) -> dict[str, list[Path]]:
    by_class = {}
    for entry in _entries(split_dir, real_root):
        if not entry.is_dir():
            raise DataError(
                f"File {entry} is not inside a class folder: expected {split_dir}/<class>/<image>"
            )
        images = []
        for path in _entries(entry, real_root):
            if path.is_dir():
                raise DataError(f"Unexpected folder {path}: class folders hold images only")
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(
                    f"File {path} is not an image: expected {', '.join(IMAGE_EXTENSIONS)}"
                )
            images.append(path)
        if not images:
            raise DataError(f"Class folder {entry} is empty")
        by_class[entry.name] = images
    if not by_class:
        raise DataError(f"Split folder {split_dir} has no class folders")
    return by_class


def _file_reader(paths: list[Path], config: DataConfig) -> Reader:
    def read(indices: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
        for i in indices:
            yield _decode_file(paths[i], config), str(paths[i])

    return read


def _decode_file(path: Path | str, config: DataConfig, data: bytes | None = None) -> np.ndarray:
    """Decode one image file (or its ``data``, fetched from ``path``) to uint8 ``[H, W, C]`` in
    the configured channels and size."""
    import io

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(
                        f"Image {path} has {width}x{height} pixels, more than the "
                        f"limit of {MAX_PIXELS}"
                    )
                if image.mode in _UNSUPPORTED_MODES:
                    raise DataError(
                        f"Image {path} has mode {image.mode!r} (16-bit or float "
                        f"pixels): convert it to 8 bits first"
                    )
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_array(image, config)
    except DataError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        TypeError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as err:
        # Pillow reports unknown formats, truncated data and broken headers with these.
        raise DataError(f"Cannot decode image {path}: {err}") from err


def _to_array(image: Any, config: DataConfig) -> np.ndarray:
    from PIL import Image

    mode = "L" if config.channels == 1 else "RGB"
    if image.mode == "P":  # palette transparency converts cleanly only through RGBA
        image = image.convert("RGBA")
    if image.mode != mode:
        image = image.convert(mode)
    size = config.image_size
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _convert_array(image: np.ndarray, config: DataConfig, where: str) -> np.ndarray:
    """Convert a uint8 ``[H, W, C]`` array like a decoded file (a no-op when it already fits)."""
    height, width, channels = image.shape
    size = config.image_size
    if channels == config.channels and (not size or (height, width) == (size, size)):
        return image
    from PIL import Image

    try:
        pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if channels == 1 else image))
    except (TypeError, ValueError) as err:
        raise DataError(f"Cannot convert image {where} with shape {image.shape}: {err}") from err
    return _to_array(pil, config)


# ---- gs:// sources: a .npz object, or an image-folder prefix streamed one object at a time

# An image object larger than this is refused before it is downloaded.
MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Objects downloaded ahead of the writer: memory holds at most this many encoded images.
_PREFETCH = 8


def _open_gcs(uri: str, config: DataConfig) -> tuple[list[str], dict[str, _Split]]:
    import tempfile

    if uri.lower().endswith(".npz"):
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.download_file(uri, Path(tmp) / "source.npz")
            return _open_npz(local, config, uri)  # reads the arrays: the file can go
    root = uri.rstrip("/")
    files: dict[str, dict[str, list[str]]] = {}
    names = storage.list_uri(root)
    if not names:
        raise storage.ObjectNotFoundError(
            f"Data source not found: no objects under {root}/ (expected a .npz object or an "
            f"image-folder prefix {root}/<train|val|test>/<class>/<image>)"
        )
    for name in names:
        parts = name.split("/")
        if name.endswith("/") or any(part.startswith(".") for part in parts):
            continue  # folder placeholders and hidden files, as in local folders
        where = f"{root}/{name}"
        if len(parts) == 1:
            if name == INFO_FILE:
                raise DataError(
                    f"{root} is a prepared dataset: read prepared datasets from a local folder"
                )
            continue  # other files at the top (README, LICENSE) are not part of the data
        if parts[0] not in SPLITS:
            raise DataError(f"Unknown split folder {root}/{parts[0]}: expected train, val or test")
        if len(parts) == 2:
            raise DataError(
                f"File {where} is not inside a class folder: expected "
                f"{root}/{parts[0]}/<class>/<image>"
            )
        if len(parts) > 3:
            raise DataError(
                f"Unexpected folder {root}/{'/'.join(parts[:3])}: class folders hold images only"
            )
        if Path(parts[2]).suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"File {where} is not an image: expected {', '.join(IMAGE_EXTENSIONS)}")
        files.setdefault(parts[0], {}).setdefault(parts[1], []).append(where)
    return _folder_splits(root, files, config, _gcs_reader)


def _gcs_reader(uris: list[str], config: DataConfig) -> Reader:
    def fetch(uri: str) -> bytes:
        return storage.read_bytes(uri, max_bytes=MAX_IMAGE_BYTES)

    def read(indices: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
        import collections
        from concurrent.futures import ThreadPoolExecutor

        wanted = iter(indices)
        with ThreadPoolExecutor(max_workers=_PREFETCH) as pool:
            pending = collections.deque()
            for i in wanted:
                pending.append((i, pool.submit(fetch, uris[i])))
                if len(pending) == _PREFETCH:
                    break
            while pending:
                i, future = pending.popleft()
                following = next(wanted, None)
                if following is not None:
                    pending.append((following, pool.submit(fetch, uris[following])))
                yield _decode_file(uris[i], config, data=future.result()), uris[i]

    return read


# ---- prepared datasets


def _open_prepared(folder: Path, config: DataConfig) -> tuple[list[str], dict[str, _Split]]:
    from cycleprune.compat import tf

    info = load_info(folder, verify=True)
    parse = _parse_fn(tf, None)
    splits = {}
    for split in info.shards:
        if split not in SPLITS:
            raise DataError(f"{folder / INFO_FILE}: unknown split {split!r}")
        files = _shard_paths(folder, info, split)
        labels = np.fromiter(
            (y for _, y in tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator()),
            dtype=np.int64,
        )
        if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise DataError(
                f"{folder}: split {split!r} has label {labels.max()} outside "
                f"0..{info.num_classes - 1}"
            )
        where = f"{folder} split {split!r}"
        splits[split] = _Split(labels, _record_reader(files, parse, config, where), where)
    for split in ("train", "test"):
        if split not in splits:
            raise DataError(f"Prepared dataset {folder} has no {split!r} split")
    return list(info.class_names), splits


def _record_reader(files: list[str], parse: Any, config: DataConfig, where: str) -> Reader:
    from cycleprune.compat import tf

    def read(indices: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
        wanted = iter(indices)
        target = next(wanted, None)
        records = tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator()
        for position, (image, _) in enumerate(records):
            if target is None:
                break
            if position == target:
                name = f"{where} record {position}"
                yield _convert_array(image, config, name), name
                target = next(wanted, None)

    return read


# --------------------------------------------------------------------------------------------
# Writing


def _write(
    tmp: Path, plan: dict[str, tuple[_Split, np.ndarray, np.ndarray]], config: DataConfig
) -> tuple[dict[str, list[str]], tuple[int, int, int]]:
    from cycleprune.compat import tf

    size = config.image_size
    shape: tuple[int, int, int] | None = (size, size, config.channels) if size else None
    first = ""
    shards: dict[str, list[str]] = {}
    for split, (part, indices, labels) in plan.items():
        n_shards = max(1, -(-len(indices) // config.shard_size))
        names = [f"{split}-{i:05d}-of-{n_shards:05d}.tfrecord" for i in range(n_shards)]
        shards[split] = names
        writer = None
        written = 0
        try:
            for (image, where), label in zip(part.read(indices), labels, strict=True):
                if shape is None:
                    shape, first = image.shape, where
                elif image.shape != shape:
                    source = f" (the size of {first})" if first else ""
                    raise DataError(
                        f"Image {where} has shape {image.shape}, expected "
                        f"{shape}{source}; set data.image_size to resize"
                    )
                if written % config.shard_size == 0:
                    if writer is not None:
                        writer.close()
                    writer = tf.io.TFRecordWriter(
                        os.fspath(tmp / names[written // config.shard_size])
                    )
                writer.write(_serialize(tf, image, int(label)))
                written += 1
        finally:
            if writer is not None:
                writer.close()
    if shape is None:  # unreachable: every split was checked non-empty
        raise DataError("No images were written")
    return shards, tuple(int(v) for v in shape)


def _serialize(tf: Any, image: np.ndarray, label: int) -> bytes:
    def ints(value: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    height, width, channels = image.shape
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": ints(label),
        "height": ints(height),
        "width": ints(width),
        "channels": ints(channels),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def _content_hash(folder: Path, class_names: Any, shards: Mapping[str, list[str]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(list(class_names)).encode())
    for split in sorted(shards):
        for name in shards[split]:
            digest.update(f"\n{split}/{name}\n".encode())
            with open(Path(folder) / name, "rb") as handle:
                for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "DataError",
    "DatasetInfo",
    "class_weights",
    "load_arrays",
    "load_info",
    "make_dataset",
    "prepare_dataset",
]
