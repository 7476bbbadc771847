"""cycleprune.data: preparing sources, reading prepared datasets, tf.data pipelines."""

from __future__ import annotations

import datetime
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cycleprune import data
from cycleprune.config import DataConfig
from cycleprune.data import DataError, DatasetInfo

NAMES = ("normal", "pneumonia")


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def _images(n: int, start: int = 0, size: int = 6) -> np.ndarray:
    """``n`` distinct uint8 images: pixel [0, 0] and [0, 1] encode the image's id."""
    rng = np.random.default_rng(start)
    x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    ids = np.arange(start, start + n)
    x[:, 0, 0], x[:, 0, 1] = ids % 256, ids // 256
    return x


def _ids(images: np.ndarray) -> list[int]:
    return sorted(
        int(a) + 256 * int(b) for a, b in zip(images[:, 0, 0, 0], images[:, 0, 1, 0], strict=True)
    )


def _labels(*counts: int) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts).astype(np.uint8)


def _arrays(with_val: bool = True) -> dict[str, np.ndarray]:
    arrays = {
        "train_images": _images(60, 0),
        "train_labels": _labels(20, 40)[:, None],
        "test_images": _images(12, 1000),
        "test_labels": _labels(4, 8),
    }
    if with_val:
        arrays["val_images"] = _images(9, 2000)
        arrays["val_labels"] = _labels(3, 6)
    return arrays


def _npz(path: Path, arrays: dict[str, np.ndarray], **kwargs) -> Path:
    np.savez(path, **arrays, **kwargs)
    return path


def _out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "dataset"


def _assert_no_output(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []


def _save(path: Path, mode: str, size: tuple[int, int], seed: int, fmt: str | None = None):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, fmt)
    return path


def _tree(root: Path, splits=("train", "val", "test"), per_class=(3, 5)) -> list[Path]:
    """A chest_xray-like tree: grayscale PNG, RGB PNG and JPEG files, all 10x10."""
    files = []
    seed = 0
    for split in splits:
        for cls, n in zip(("NORMAL", "PNEUMONIA"), per_class, strict=True):
            for i in range(n):
                seed += 1
                kind = ("L", ".png"), ("RGB", ".png"), ("L", ".jpeg"), ("RGB", ".JPG")
                mode, ext = kind[i % 4]
                files.append(_save(root / split / cls / f"img{i}{ext}", mode, (10, 10), seed))
    return files


def _decoded(path: Path, mode: str = "L", size: int = 0) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert(mode)
        if size:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


@pytest.fixture
def npz_path(tmp_path) -> Path:
    return _npz(tmp_path / "small.npz", _arrays())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small synthetic dataset: 60/9/12 images, 2 classes, 3 training shards."""
    folder = tmp_path_factory.mktemp("prepared")
    src = _npz(folder / "src.npz", _arrays())
    out = folder / "dataset"
    data.prepare_dataset(str(src), str(out), DataConfig(shard_size=25, class_names=NAMES))
    return out


# ---------------------------------------------------------------------------------------------
# .npz sources


def test_npz_round_trip_is_exact_and_hash_is_stable(tiny_npz, tmp_path):
    config = DataConfig(class_names=NAMES, shard_size=100)
    info = data.prepare_dataset(str(tiny_npz), str(tmp_path / "a"), config)
    with np.load(tiny_npz) as src:
        for split in ("train", "val", "test"):
            images, labels = data.load_arrays(tmp_path / "a", split)
            expected = src[f"{split}_labels"].reshape(-1)
            assert images.dtype == np.uint8 and labels.dtype == np.int64
            np.testing.assert_array_equal(images[..., 0], src[f"{split}_images"])
            np.testing.assert_array_equal(labels, expected)
            assert info.counts[split] == {
                "normal": int(np.sum(expected == 0)),
                "pneumonia": int(np.sum(expected == 1)),
            }
    assert info.class_names == NAMES
    assert info.image_shape == (28, 28, 1)
    assert info.num_examples("train") == 240
    assert info.shards["train"] == [
        "train-00000-of-00003.tfrecord",
        "train-00001-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord",
    ]
    assert info.version == info.content_hash[:12] and len(info.content_hash) == 64
    created = datetime.datetime.fromisoformat(info.created)
    assert created.utcoffset() == datetime.timedelta(0)
    assert data.load_info(tmp_path / "a") == info
    again = data.prepare_dataset(str(tiny_npz), str(tmp_path / "b"), config)
    assert again.content_hash == info.content_hash
    other = data.prepare_dataset(str(tiny_npz), str(tmp_path / "c"), DataConfig(channels=3))
    assert other.content_hash != info.content_hash


def test_npz_class_names_default_and_from_file(tmp_path):
    config = DataConfig()
    plain = data.prepare_dataset(_npz(tmp_path / "a.npz", _arrays()), tmp_path / "a", config)
    assert plain.class_names == ("class_0", "class_1")
    named = _npz(tmp_path / "b.npz", _arrays(), class_names=np.array(["cat", "dog"]))
    assert data.prepare_dataset(named, tmp_path / "b", config).class_names == ("cat", "dog")
    same = DataConfig(class_names=("cat", "dog"))
    assert data.prepare_dataset(named, tmp_path / "c", same).class_names == ("cat", "dog")
    # Names given twice must agree, order included: one of them would mislabel the classes.
    for other in (NAMES, ("dog", "cat")):
        out = tmp_path / f"d-{other[0]}"
        with pytest.raises(DataError, match=r"b\.npz names its classes \['cat', 'dog'\], but "):
            data.prepare_dataset(named, out, DataConfig(class_names=other))
        _assert_no_output(out)


def test_integer_images_in_byte_range_are_accepted(tmp_path):
    arrays = _arrays()
    arrays["train_images"] = arrays["train_images"].astype(np.int64)
    data.prepare_dataset(_npz(tmp_path / "a.npz", arrays), tmp_path / "a", DataConfig())
    images, _ = data.load_arrays(tmp_path / "a", "train")
    np.testing.assert_array_equal(images[..., 0], arrays["train_images"])


def test_val_is_carved_stratified_and_seeded(tmp_path):
    src = _npz(tmp_path / "noval.npz", _arrays(with_val=False))
    config = DataConfig(val_fraction=0.25, seed=3)
    info = data.prepare_dataset(src, tmp_path / "a", config)
    assert info.counts["val"] == {"class_0": 5, "class_1": 10}
    assert info.counts["train"] == {"class_0": 15, "class_1": 30}
    train, _ = data.load_arrays(tmp_path / "a", "train")
    val, val_labels = data.load_arrays(tmp_path / "a", "val")
    assert sorted(_ids(train) + _ids(val)) == list(range(60))
    np.testing.assert_array_equal(val_labels, (np.array(_ids(val)) >= 20).astype(np.int64))
    data.prepare_dataset(src, tmp_path / "b", config)
    assert _ids(data.load_arrays(tmp_path / "b", "val")[0]) == _ids(val)
    data.prepare_dataset(src, tmp_path / "c", DataConfig(val_fraction=0.25, seed=4))
    assert _ids(data.load_arrays(tmp_path / "c", "val")[0]) != _ids(val)


def test_limit_keeps_class_shares_and_is_seeded(npz_path, tmp_path):
    info = data.prepare_dataset(npz_path, tmp_path / "a", DataConfig(limit=12))
    assert info.counts["train"] == {"class_0": 4, "class_1": 8}
    assert info.counts["val"] == {"class_0": 3, "class_1": 6}  # 9 <= limit: all kept
    assert info.counts["test"] == {"class_0": 4, "class_1": 8}
    again = data.prepare_dataset(npz_path, tmp_path / "b", DataConfig(limit=12))
    assert again.content_hash == info.content_hash
    tiny = data.prepare_dataset(npz_path, tmp_path / "c", DataConfig(limit=2))
    assert all(c == {"class_0": 1, "class_1": 1} for c in tiny.counts.values())
    out = tmp_path / "d"
    with pytest.raises(DataError, match=r"data\.limit=1 keeps fewer .* split 'train' .*limit >= 2"):
        data.prepare_dataset(npz_path, out, DataConfig(limit=1))
    _assert_no_output(out)


def test_resize_and_channels(npz_path, tmp_path):
    info = data.prepare_dataset(npz_path, tmp_path / "a", DataConfig(image_size=12, channels=3))
    assert info.image_shape == (12, 12, 3)
    images, _ = data.load_arrays(tmp_path / "a", "test")
    assert images.shape == (12, 12, 12, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    first = np.load(npz_path)["test_images"][0]
    expected = np.asarray(Image.fromarray(first).resize((12, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images[0, ..., 1], expected)


def test_prepared_dataset_as_source(prepared, tmp_path):
    info = data.load_info(prepared)
    same = data.prepare_dataset(prepared, tmp_path / "same", DataConfig(shard_size=25))
    assert same.content_hash == info.content_hash
    assert same.class_names == NAMES
    small = data.prepare_dataset(prepared, tmp_path / "small", DataConfig(image_size=3))
    assert small.image_shape == (3, 3, 1)
    assert small.counts == info.counts
    source, labels = data.load_arrays(prepared, "val")
    images, small_labels = data.load_arrays(tmp_path / "small", "val")
    np.testing.assert_array_equal(small_labels, labels)
    expected = np.asarray(Image.fromarray(source[4, ..., 0]).resize((3, 3), Image.BILINEAR))
    np.testing.assert_array_equal(images[4, ..., 0], expected)


def test_tampered_prepared_dataset_is_refused(prepared, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in prepared.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / data.load_info(copy).shards["test"][0]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")
    out = _out(tmp_path)
    with pytest.raises(DataError, match="content_hash"):
        data.prepare_dataset(copy, out, DataConfig())
    _assert_no_output(out)
    # The stages check it before reading a record: one error line naming the dataset, exit 2
    # (not a TensorFlow DataLossError mid-epoch, which names no file).
    assert data.load_info(copy).content_hash  # only the shards' presence is checked
    with pytest.raises(DataError, match=rf"Prepared dataset {copy} does not match its content"):
        data.load_info(copy, verify=True)
    from cycleprune import cli

    argv = ["find-lr", "--dataset", str(copy), "--out", str(tmp_path / "lr"), "--preset", "smoke"]
    assert cli.main(argv) == 2
    assert f"error: Prepared dataset {copy} does not match" in capsys.readouterr().err
    assert not (tmp_path / "lr").exists()


# ---------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_round_trip(tmp_path):
    root = tmp_path / "chest_xray"
    files = _tree(root)
    (root / "README.txt").write_text("not data")
    info = data.prepare_dataset(root, tmp_path / "a", DataConfig(channels=1, shard_size=4))
    assert info.class_names == ("NORMAL", "PNEUMONIA")
    assert info.image_shape == (10, 10, 1)
    assert info.counts == {s: {"NORMAL": 3, "PNEUMONIA": 5} for s in ("train", "val", "test")}
    assert len(info.shards["train"]) == 2
    for split in ("train", "val", "test"):
        images, labels = data.load_arrays(tmp_path / "a", split)
        got = sorted((int(y), x.tobytes()) for x, y in zip(images, labels, strict=True))
        want = sorted(
            (int(p.parent.name == "PNEUMONIA"), _decoded(p).tobytes())
            for p in files
            if p.parts[-3] == split
        )
        assert got == want
    again = data.prepare_dataset(root, tmp_path / "again", DataConfig(channels=1, shard_size=4))
    assert again.content_hash == info.content_hash
    rgb = data.prepare_dataset(root, tmp_path / "b", DataConfig(channels=3, image_size=7))
    assert rgb.image_shape == (7, 7, 3)
    images, _ = data.load_arrays(tmp_path / "b", "test")
    want = sorted(_decoded(p, "RGB", 7).tobytes() for p in files if p.parts[-3] == "test")
    assert sorted(x.tobytes() for x in images) == want


def test_image_folder_is_written_in_seeded_random_order(tmp_path):
    root = tmp_path / "tree"
    _tree(root, per_class=(6, 6))
    orders = []
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{seed}-{len(orders)}"
        data.prepare_dataset(root, out, DataConfig(seed=seed))
        orders.append(data.load_arrays(out, "test")[1].tolist())
    assert orders[0] != sorted(orders[0])  # classes mixed, not one block after the other
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


def test_image_folder_without_val_is_carved_and_mixed_sizes_resize(tmp_path):
    root = tmp_path / "tree"
    _tree(root, splits=("train", "test"), per_class=(4, 8))
    _save(root / "train" / "NORMAL" / "big.png", "L", (16, 12), 99)
    info = data.prepare_dataset(root, tmp_path / "a", DataConfig(val_fraction=0.25, image_size=8))
    assert info.counts["val"] == {"NORMAL": 1, "PNEUMONIA": 2}
    assert info.counts["train"] == {"NORMAL": 4, "PNEUMONIA": 6}
    assert info.image_shape == (8, 8, 1)


def test_folders_are_streamed_one_image_at_a_time(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _tree(root)
    events = []
    decode, serialize = data._decode_file, data._serialize

    def logged_decode(*args, **kwargs):
        events.append(1)
        return decode(*args, **kwargs)

    def logged_serialize(*args, **kwargs):
        events.append(-1)
        return serialize(*args, **kwargs)

    monkeypatch.setattr(data, "_decode_file", logged_decode)
    monkeypatch.setattr(data, "_serialize", logged_serialize)
    data.prepare_dataset(root, tmp_path / "a", DataConfig())
    assert len(events) == 2 * 24
    assert max(np.cumsum(events)) == 1  # never more than one decoded image waiting to be written


# ---------------------------------------------------------------------------------------------
# Bad inputs: a DataError naming the culprit, and no output left behind


def _bad_npz(tmp_path: Path, change) -> Path:
    arrays = _arrays()
    change(arrays)
    return _npz(tmp_path / "bad.npz", arrays)


def _set(key, value):
    return lambda arrays: arrays.__setitem__(key, value)


def _drop(key):
    return lambda arrays: arrays.pop(key)


def _nan_images(arrays):
    x = arrays["test_images"].astype(np.float32)
    x[3, 2, 2] = np.nan
    arrays["test_images"] = x


def _one_class(arrays):
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"] = np.zeros_like(arrays[f"{split}_labels"])


def _ragged(arrays):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)
    arrays["val_images"] = ragged
    arrays["val_labels"] = np.array([0, 1])


BAD_NPZ = {
    "missing key": (_drop("test_labels"), "no array 'test_labels'"),
    "count mismatch": (_set("val_labels", _labels(3, 5)), "val_images has 9 images but val_labels"),
    "negative label": (_set("test_labels", np.array([0] * 11 + [-1])), r"test_labels\[11\] = -1"),
    "huge label": (_set("test_labels", np.array([0] * 11 + [2**31])), r"test_labels\[11\]"),
    "float labels": (_set("val_labels", _labels(3, 6).astype(float)), "val_labels.*float64"),
    "label shape": (_set("val_labels", np.zeros((9, 2), int)), r"val_labels.*\(9, 2\)"),
    "NaN pixels": (_nan_images, "test_images contains NaN"),
    "float pixels": (_set("test_images", _images(12, 1000) / 255.0), "test_images.*float64"),
    "out of range": (_set("test_images", _images(12).astype(np.int16) - 1), "test_images values"),
    "image shape": (_set("test_images", np.zeros((12, 4), np.uint8)), r"test_images.*\(12, 4\)"),
    "ragged images": (_ragged, "'val_images' cannot be loaded without pickle"),
    "single class": (_one_class, "at least 2 classes"),
    "class gap": (_set("train_labels", _labels(20, 0, 40)), "'class_1' .* no images in split"),
    # Validation fixes the threshold and test computes sensitivity and AUC: both need each class.
    "val class gap": (_set("val_labels", _labels(9)), "'class_1' .* no images in split 'val'"),
    "test class gap": (_set("test_labels", _labels(0, 12)), "'class_0' .* in split 'test'"),
    "empty split": (
        lambda a: a.update(val_images=np.zeros((0, 6, 6), np.uint8), val_labels=np.zeros(0, int)),
        "'val' is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_raises_data_error(case, tmp_path):
    change, message = BAD_NPZ[case]
    src = _bad_npz(tmp_path, change)
    out = _out(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        data.prepare_dataset(src, out, DataConfig())
    assert "bad.npz" in str(err.value)
    _assert_no_output(out)


def test_bad_npz_files(tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(DataError, match=r"text\.npz"):
        data.prepare_dataset(text, _out(tmp_path), DataConfig())
    three = _bad_npz(tmp_path, _set("test_labels", _labels(4, 4, 4)))
    with pytest.raises(DataError, match=r"bad\.npz: label 2 is out of range.*data\.class_names"):
        data.prepare_dataset(three, _out(tmp_path), DataConfig(class_names=NAMES))
    one_name = _npz(tmp_path / "y.npz", _arrays(), class_names=np.array(["a"]))
    with pytest.raises(DataError, match=r"y\.npz 'class_names'"):
        data.prepare_dataset(one_name, _out(tmp_path), DataConfig())
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(DataError, match=r"data\.csv"):
        data.prepare_dataset(other, _out(tmp_path), DataConfig())
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz"):
        data.prepare_dataset(tmp_path / "nowhere.npz", _out(tmp_path), DataConfig())
    _assert_no_output(_out(tmp_path))


def _corrupt(root: Path) -> Path:
    path = root / "test" / "PNEUMONIA" / "img2.jpeg"
    path.write_bytes(b"this is not a JPEG at all")
    return path


def _truncated(root: Path) -> Path:
    path = _save(root / "test" / "NORMAL" / "cut.png", "L", (10, 10), 5)
    path.write_bytes(path.read_bytes()[:80])
    return path


def _text_file(root: Path) -> Path:
    path = root / "val" / "NORMAL" / "notes.txt"
    path.write_text("x")
    return path


def _empty_class(root: Path) -> Path:
    for path in (root / "val" / "NORMAL").iterdir():
        path.unlink()
    return root / "val" / "NORMAL"


def _single_class(root: Path) -> Path:
    for split in ("train", "val", "test"):
        for path in (root / split / "NORMAL").iterdir():
            path.unlink()
        (root / split / "NORMAL").rmdir()
    return root


def _unknown_split(root: Path) -> Path:
    (root / "validation" / "NORMAL").mkdir(parents=True)
    return root / "validation"


def _no_test(root: Path) -> Path:
    (root / "test").rename(root.parent / "elsewhere")
    return root


def _class_mismatch(root: Path) -> Path:
    (root / "test" / "PNEUMONIA").rename(root / "test" / "COVID")
    return root / "test"


def _outside_link(root: Path) -> Path:
    target = _save(root.parent / "outside.png", "L", (10, 10), 7)
    link = root / "train" / "NORMAL" / "link.png"
    link.symlink_to(target)
    return link


def _stray_file(root: Path) -> Path:
    return _save(root / "train" / "stray.png", "L", (10, 10), 8)


def _mixed_sizes(root: Path) -> Path:
    return _save(root / "test" / "NORMAL" / "wide.png", "L", (12, 10), 9)


def _too_big(root: Path) -> Path:
    return _save(root / "val" / "PNEUMONIA" / "huge.png", "L", (12, 12), 10)


def _not_utf8_name(root: Path) -> Path:
    # A class folder named in latin-1 (an archive unpacked with another encoding).
    folder = os.fsdecode(os.fsencode(root / "train") + b"/PNEUMON\xcdA")
    os.rename(root / "train" / "PNEUMONIA", folder)
    return root / "train"


def _sixteen_bit(root: Path) -> Path:
    path = root / "val" / "PNEUMONIA" / "deep.png"
    Image.fromarray(np.full((10, 10), 4000, np.uint16)).save(path)
    return path


BAD_FOLDERS = {
    "corrupt image": (_corrupt, "Cannot decode image"),
    "truncated image": (_truncated, "Cannot decode image"),
    "non-image file": (_text_file, "is not an image"),
    "empty class folder": (_empty_class, "Class folder .* is empty"),
    "single class": (_single_class, "at least 2 classes"),
    "unknown split": (_unknown_split, "Unknown split folder"),
    "missing test": (_no_test, "no 'test' split folder .*evaluation needs"),
    "class mismatch": (_class_mismatch, r"different classes.*missing \['PNEUMONIA'\]"),
    "symlink outside": (_outside_link, "points outside"),
    "file outside class": (_stray_file, "not inside a class folder"),
    "mixed sizes": (_mixed_sizes, r"shape \(10, 12, 1\), expected \(10, 10, 1\)"),
    "too many pixels": (_too_big, "more than the limit of 120"),
    "16-bit image": (_sixteen_bit, "mode 'I;16'"),
    "class folder name not UTF-8": (_not_utf8_name, r"PNEUMON\\xcdA' is not a UTF-8 name"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_image_folder_raises_data_error(case, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 120)
    root = tmp_path / "tree"
    _tree(root)
    make, message = BAD_FOLDERS[case]
    culprit = make(root)
    out = _out(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        data.prepare_dataset(root, out, DataConfig(shard_size=2))
    assert str(culprit) in str(err.value)
    _assert_no_output(out)


def test_failure_keeps_the_previous_output(prepared, tmp_path):
    out = tmp_path / "out"
    data.prepare_dataset(prepared, out, DataConfig())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = tmp_path / "tree"
    _tree(root)
    _corrupt(root)
    with pytest.raises(DataError, match=r"img2\.jpeg"):
        data.prepare_dataset(root, out, DataConfig())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_output_folder_that_holds_the_source_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    src = _npz(folder / "src.npz", _arrays())
    before = src.read_bytes()
    with pytest.raises(DataError, match=r"holds the source .*src\.npz"):
        data.prepare_dataset(src, folder, DataConfig())
    # A folder that is not a prepared dataset is never replaced, source or not.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"notes is not empty and holds no dataset\.json"):
        data.prepare_dataset(src, tmp_path / "notes", DataConfig())
    assert src.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["src.npz"]
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_load_info_errors(tmp_path, prepared):
    with pytest.raises(DataError, match=r"A prepared dataset: gs://b/ds is a gs:// URI, but this"):
        data.load_info("gs://b/ds")
    with pytest.raises(DataError, match=r"has no dataset\.json"):
        data.load_info(tmp_path)
    (tmp_path / "dataset.json").write_text('{"class_names": ["a", "b"]}')
    with pytest.raises(DataError, match=r"missing key\(s\): counts"):
        data.load_info(tmp_path)
    with pytest.raises(ValueError, match="split='train2'"):
        data.load_arrays(prepared, "train2")


# ---------------------------------------------------------------------------------------------
# tf.data pipelines


def _collect(ds):
    parts = list(zip(*(tuple(t.numpy() for t in batch) for batch in ds), strict=True))
    return [np.concatenate(p) for p in parts], [len(p) for p in parts[0]]


def test_make_dataset_eval_order_shapes_and_weights(prepared):
    config = DataConfig(batch_size=16)
    images, labels = data.load_arrays(prepared, "train")
    assert len(data.load_info(prepared).shards["train"]) == 3
    weights = {0: 2.0, 1: 0.5}
    ds = data.make_dataset(prepared, "train", config, training=False, class_weight=weights)
    assert [tuple(s.shape) for s in ds.element_spec] == [(None, 6, 6, 1), (None, 2), (None,)]
    (x, y, w), sizes = _collect(ds)
    assert sizes == [16, 16, 16, 12]  # drop_remainder=False
    assert x.dtype == np.float32 and y.dtype == np.float32 and w.dtype == np.float32
    np.testing.assert_array_equal(x, images.astype(np.float32))
    np.testing.assert_array_equal(y, np.eye(2, dtype=np.float32)[labels])
    np.testing.assert_array_equal(w, np.where(labels == 0, 2.0, 0.5).astype(np.float32))
    with pytest.raises(ValueError, match="class_weight"):
        data.make_dataset(prepared, "val", config, training=False, class_weight={0: 1.0})


def test_cache_only_when_the_split_fits(prepared):
    info = data.load_info(prepared)
    assert data._fits_cache(info, "train", DataConfig(cache_max_mb=1))
    assert not data._fits_cache(info, "train", DataConfig(cache_max_mb=0))
    assert not data._fits_cache(info, "train", DataConfig(cache=False))


def test_cached_records_read_the_shards_once_and_epochs_depend_only_on_their_seed(
    prepared, tmp_path
):
    import shutil

    from cycleprune import training

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    config = DataConfig(batch_size=16, augment=False, seed=1)
    batches = training.epoch_batches(copy, config, batch_size=16)
    (first, _), sizes = _collect(batches(0))
    assert sizes == [16, 16, 16, 12] and sorted(_ids(first.astype(np.uint8))) == list(range(60))
    for shard in data.load_info(copy).shards["train"]:
        (copy / shard).write_bytes(b"")  # later epochs must not read the shards again
    (second, _), _ = _collect(batches(1))
    assert sorted(_ids(second.astype(np.uint8))) == list(range(60))
    assert not np.array_equal(first, second)  # each epoch its own shuffle
    # A fresh run (e.g. resumed at epoch 1) sees the same epoch-1 batches.
    (again, _), _ = _collect(training.epoch_batches(prepared, config, batch_size=16)(1))
    np.testing.assert_array_equal(second, again)


def test_cached_records_only_when_they_do_not_change_the_data(prepared):
    assert data.cached_records(prepared, "train", DataConfig()) is not None
    assert data.cached_records(prepared, "train", DataConfig(cache=False)) is None
    assert data.cached_records(prepared, "train", DataConfig(cache_max_mb=0)) is None
    assert data.cached_records(prepared, "train", DataConfig(shuffle_buffer=59)) is None


def test_make_dataset_training_shuffles_without_augmentation(prepared):
    config = DataConfig(batch_size=16, augment=False, seed=1)
    images, labels = data.load_arrays(prepared, "train")
    ds = data.make_dataset(prepared, "train", config, training=True)
    (x1, y1), sizes = _collect(ds)
    (x2, _), _ = _collect(ds)
    assert sizes == [16, 16, 16, 12]
    assert _ids(x1.astype(np.uint8)) == list(range(60))  # every image once, pixels untouched
    assert not np.array_equal(x1, images.astype(np.float32))  # shuffled
    assert not np.array_equal(x1, x2)  # reshuffled each epoch
    assert Counter(y1.argmax(1).tolist()) == Counter(labels.tolist())
    for i in range(len(x1)):  # labels travel with their images
        assert y1[i].argmax() == int(_ids(x1[i : i + 1].astype(np.uint8))[0] >= 20)
    (x3, _), _ = _collect(data.make_dataset(prepared, "train", config, training=True))
    np.testing.assert_array_equal(x1, x3)  # seeded


def test_make_dataset_augmentation(prepared):
    config = DataConfig(batch_size=60, translate=0.2, rotate=0.1, zoom=0.2, flip=True, cache=False)
    (x1, y1), _ = _collect(data.make_dataset(prepared, "train", config, training=True))
    (x2, _), _ = _collect(data.make_dataset(prepared, "train", config, training=True))
    plain = DataConfig(batch_size=60, augment=False)
    (x0, y0), _ = _collect(data.make_dataset(prepared, "train", plain, training=True))
    assert x1.shape == (60, 6, 6, 1)
    assert x1.min() >= 0.0 and x1.max() <= 255.0
    np.testing.assert_array_equal(y1, y0)  # same shuffle, augmentation leaves labels alone
    assert np.mean(x1 != x0) > 0.5
    np.testing.assert_array_equal(x1, x2)  # seeded
    (xe, _), _ = _collect(data.make_dataset(prepared, "test", config, training=False))
    np.testing.assert_array_equal(xe, data.load_arrays(prepared, "test")[0].astype(np.float32))


def test_make_dataset_turns_autotuning_off(prepared):
    # An autotuned pipeline, dropped after each epoch's fit/evaluate, can hold fit up for
    # seconds (see data.pipeline_options); every batch pipeline must come without it.
    for split, training in (("train", True), ("val", False)):
        ds = data.make_dataset(prepared, split, DataConfig(batch_size=8), training=training)
        assert ds.options().autotune.enabled is False
    records = data.cached_records(prepared, "train", DataConfig())
    ds = data.make_dataset(prepared, "train", DataConfig(), training=True, records=records)
    assert ds.options().autotune.enabled is False


def test_make_dataset_contrast_augmentation(prepared):
    geometric_off = {"translate": 0.0, "rotate": 0.0, "zoom": 0.0, "cache": False}
    plain = DataConfig(batch_size=60, augment=False)
    (x0, y0), _ = _collect(data.make_dataset(prepared, "train", plain, training=True))
    contrast = DataConfig(batch_size=60, contrast=0.5, **geometric_off)
    (xc, yc), _ = _collect(data.make_dataset(prepared, "train", contrast, training=True))
    (xc2, _), _ = _collect(data.make_dataset(prepared, "train", contrast, training=True))
    np.testing.assert_array_equal(xc, xc2)  # seeded
    np.testing.assert_array_equal(yc, y0)  # labels untouched
    assert xc.min() >= 0.0 and xc.max() <= 255.0
    # One factor per image (Keras' RandomContrast draws one per batch): the images' spreads
    # around their own means change by different factors within [0.5, 1.5].
    x0f, xcf = x0.reshape(60, -1), xc.reshape(60, -1)
    varied = x0f.std(1) > 1.0
    ratio = xcf.std(1)[varied] / x0f.std(1)[varied]
    assert ratio.min() < 0.9 and ratio.max() > 1.1
    assert ratio.min() > 0.5 - 1e-3 and ratio.max() < 1.5 + 1e-3
    # The mean brightness of an image stays where it was (up to clipping at 0 and 255).
    unclipped = ((xc > 0) & (xc < 255)).reshape(60, -1).all(1)
    assert unclipped.sum() >= 10
    np.testing.assert_allclose(xcf.mean(1)[unclipped], x0f.mean(1)[unclipped], atol=1e-3)
    # Another seed (every epoch has its own) draws other factors.
    reseeded = DataConfig(batch_size=60, contrast=0.5, seed=7, **geometric_off)
    (xs, _), _ = _collect(data.make_dataset(prepared, "train", reseeded, training=True))
    # (the same per-image factors would give the same spreads, in another order)
    assert not np.allclose(np.sort(xs.reshape(60, -1).std(1)), np.sort(xcf.std(1)))
    # Only the training split is augmented.
    (xe, _), _ = _collect(data.make_dataset(prepared, "val", contrast, training=False))
    np.testing.assert_array_equal(xe, data.load_arrays(prepared, "val")[0].astype(np.float32))


def test_augmentation_is_float32_under_mixed_precision(prepared):
    # Training builds each epoch's pipeline inside the mixed_float16 policy scope on a GPU; the
    # augmentation must neither fail (float16 layers times float32 factors) nor change.
    from cycleprune import precision

    config = DataConfig(batch_size=60, contrast=0.2, flip=True, cache=False)
    (x32, _), _ = _collect(data.make_dataset(prepared, "train", config, training=True))
    with precision.policy_scope("mixed_float16"):
        (x16, _), _ = _collect(data.make_dataset(prepared, "train", config, training=True))
    assert x16.dtype == np.float32
    np.testing.assert_array_equal(x16, x32)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_contrast_augmentation_range(value):
    with pytest.raises(ValueError, match=r"data\.contrast"):
        DataConfig(contrast=value)


# ---------------------------------------------------------------------------------------------
# Class weights


def _info(counts: dict[str, int]) -> DatasetInfo:
    return DatasetInfo(
        class_names=tuple(counts),
        counts={"train": counts, "val": counts, "test": counts},
        image_shape=(4, 4, 1),
        source="x",
        content_hash="0" * 64,
        created="2024-01-01T00:00:00+00:00",
        shards={"train": [], "val": [], "test": []},
        version="0" * 12,
    )


def test_class_weights():
    info = _info({"normal": 10, "pneumonia": 30})
    balanced = data.class_weights(info, DataConfig(class_weight="balanced"))
    assert balanced == pytest.approx({0: 40 / 20, 1: 40 / 60})
    three = data.class_weights(_info({"a": 1, "b": 2, "c": 5}), DataConfig())
    assert three == pytest.approx({0: 8 / 3, 1: 8 / 6, 2: 8 / 15})
    manual = data.class_weights(info, DataConfig(class_weight=(1.0, 0.33)))
    assert manual == {0: 1.0, 1: 0.33}
    assert data.class_weights(info, DataConfig(class_weight="none")) is None
    with pytest.raises(ValueError, match=re.escape("data.class_weight=(1.0, 2.0, 3.0)")):
        data.class_weights(info, DataConfig(class_weight=(1.0, 2.0, 3.0)))
    with pytest.raises(DataError, match="'b' has no training images"):
        data.class_weights(_info({"a": 3, "b": 0}), DataConfig())


def test_dataset_info_round_trip(prepared):
    info = data.load_info(prepared)
    assert DatasetInfo.from_dict(info.to_dict()) == info
    assert info.num_classes == 2
    assert sum(info.num_examples(s) for s in info.counts) == 81
    assert os.path.isfile(prepared / info.shards["val"][0])


def test_balanced_weights_match_scikit_learn_on_real_data(tiny_dataset):
    from sklearn.utils.class_weight import compute_class_weight

    info = data.load_info(tiny_dataset)
    _, labels = data.load_arrays(tiny_dataset, "train")
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    weights = data.class_weights(info, DataConfig())
    assert [weights[0], weights[1]] == pytest.approx(expected.tolist())
    assert weights[0] > 1 > weights[1]  # PneumoniaMNIST has ~3x more pneumonia than normal
