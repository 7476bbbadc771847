"""Property-based tests of the ``.npz`` reader: a prepared dataset that round-trips, or a DataError.

Random shapes, dtypes, labels and missing keys, and random damage to the bytes of a valid file,
go through ``prepare_dataset``. Nothing else may be raised, and a failure leaves no output (no
dataset folder, no ``.tmp-`` sibling).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cycleprune import data
from cycleprune.config import DataConfig
from cycleprune.data import DataError

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


DAMAGES = (
    "drop key",
    "image shape",
    "image dtype",
    "label values",
    "label shape",
    "label dtype",
    "class names",
    "empty split",
)


@st.composite
def npz_sources(draw) -> tuple[dict[str, np.ndarray], DataConfig]:
    """Arrays of a valid .npz, then (half the time) one kind of damage, and a config."""
    classes = draw(st.integers(2, 3))
    side = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    channels = draw(st.sampled_from([(), (), (1,), (3,)]))
    arrays = {}
    for split in ("train", "val", "test"):
        if split == "val" and draw(st.booleans()):
            continue
        # Training data needs two images of each class (one may be carved out for validation).
        fixed = list(range(classes)) * 2 if split == "train" else []
        extra = draw(
            st.lists(st.integers(0, classes - 1), min_size=1 - len(fixed) // 6, max_size=6)
        )
        labels = np.array(draw(st.permutations(fixed + extra)), np.int64)
        dtype = draw(st.sampled_from([np.uint8, np.uint8, np.int16, np.int64]))
        shape = (len(labels), *side, *channels)
        arrays[f"{split}_images"] = draw(hnp.arrays(dtype, shape, elements=st.integers(0, 255)))
        arrays[f"{split}_labels"] = labels
    damage = draw(st.sampled_from((None,) * len(DAMAGES) + DAMAGES))
    event(f"damage: {damage}")
    key = draw(st.sampled_from(sorted(arrays)))
    n = len(arrays[key])
    if damage == "drop key":
        arrays.pop(key)
    elif damage == "image shape":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4))
        arrays[key.replace("labels", "images")] = np.zeros(shape, np.uint8)
    elif damage in ("image dtype", "label dtype"):
        key = key.replace("labels", "images") if damage == "image dtype" else key
        key = key.replace("images", "labels") if damage == "label dtype" else key
        dtype = draw(st.sampled_from([np.float32, np.float64, np.bool_, np.uint16, np.int8]))
        shape = arrays[key].shape
        arrays[key] = draw(hnp.arrays(dtype, shape, elements=_elements(dtype, -300, 300)))
    elif damage == "label values":
        key = key.replace("images", "labels")
        arrays[key] = arrays[key].copy()
        arrays[key][draw(st.integers(0, n - 1))] = draw(
            st.one_of(st.integers(-(2**40), -1), st.integers(classes, 2**40))
        )
    elif damage == "label shape":
        key = key.replace("images", "labels")
        shape = draw(st.sampled_from([(n, 1), (n - 1,), (n + 1,), (n, 2), (), (n, 1, 1)]))
        arrays[key] = np.zeros(shape, np.int64)
    elif damage == "class names":
        names = draw(st.lists(st.text(max_size=3), max_size=4))
        arrays["class_names"] = np.array(names, dtype=str if names else "<U1")
    elif damage == "empty split":
        split = key.rsplit("_", 1)[0]
        arrays[f"{split}_images"] = arrays[f"{split}_images"][:0]
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:0]
    config = DataConfig(
        channels=draw(st.sampled_from([1, 1, 3])),
        image_size=draw(st.sampled_from([0, 0, 4])),
        shard_size=draw(st.sampled_from([1, 3, 100])),
        val_fraction=0.3,
    )
    return arrays, config


def _elements(dtype, low: int, high: int) -> st.SearchStrategy:
    kind = np.dtype(dtype).kind
    if kind == "b":
        return st.booleans()
    if kind == "f":
        return st.one_of(st.integers(low, high).map(float), st.floats(width=32))
    info = np.iinfo(dtype)
    return st.integers(max(low, int(info.min)), min(high, int(info.max)))


def _prepare(source: Path, config: DataConfig) -> tuple[Path, data.DatasetInfo | None]:
    out = source.parent / "out" / "dataset"
    try:
        info = data.prepare_dataset(source, out, config)
    except DataError as err:
        assert str(source) in str(err) or source.name in str(err), str(err)
        assert not out.exists()
        info = None
    event("DataError" if info is None else "prepared")
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []
    return out, info


@SETTINGS
@given(npz_sources())
def test_random_arrays_give_a_dataset_that_round_trips_or_a_data_error(source):
    arrays, config = source
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.npz"
        np.savez(path, **arrays)
        out, info = _prepare(path, config)
        if info is None:
            return
        assert data.load_info(out) == info
        side = config.image_size
        assert info.image_shape[2] == config.channels
        if side:
            assert info.image_shape[:2] == (side, side)
        # .npz splits keep their order: test comes back exactly, labels and (when no conversion
        # was needed) pixels.
        images, labels = data.load_arrays(out, "test")
        np.testing.assert_array_equal(labels, arrays["test_labels"].reshape(-1))
        source_images = arrays["test_images"]
        if source_images.ndim == 3 and config.channels == 1 and not side:
            np.testing.assert_array_equal(images[..., 0], source_images.astype(np.uint8))
        given_train = len(arrays["train_labels"]) + len(arrays.get("val_labels", ()))
        assert info.num_examples("train") + info.num_examples("val") == given_train
        for split in ("train", "val"):
            _, got = data.load_arrays(out, split)
            assert len(got) == info.num_examples(split)
            assert set(got.tolist()) <= set(range(info.num_classes))


def _valid_npz(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
        "train_labels": np.tile([0, 1], 6),
        "test_images": rng.integers(0, 256, (4, 4, 4), dtype=np.uint8),
        "test_labels": np.array([0, 1, 1, 0]),
    }
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


VALID = {False: _valid_npz(False), True: _valid_npz(True)}


@st.composite
def damaged_npz(draw) -> bytes:
    blob = bytearray(VALID[draw(st.booleans())])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert"]))
        position = draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[position] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del blob[position:]
        else:
            blob[position:position] = draw(st.binary(min_size=1, max_size=8))
        if not blob:
            break
    return bytes(blob)


@SETTINGS
@given(damaged_npz())
def test_damaged_npz_bytes_give_a_dataset_or_a_data_error(blob):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "damaged.npz"
        path.write_bytes(blob)
        out, info = _prepare(path, DataConfig(val_fraction=0.25))
        if info is not None:  # the damage hit pixel bytes only: still a valid dataset
            for split in ("train", "val", "test"):
                images, labels = data.load_arrays(out, split)
                assert images.shape[1:] == info.image_shape
                assert len(labels) == info.num_examples(split)
