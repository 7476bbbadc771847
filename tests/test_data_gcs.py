"""prepare_dataset from gs:// sources, on a real GCS emulator process."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from cycleprune import data, storage
from cycleprune.config import DataConfig


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, tiny_npz):
    """A small image-folder tree (PNG files) cut from the tiny npz."""
    root = tmp_path_factory.mktemp("tree") / "xray"
    with np.load(tiny_npz) as arrays:
        for split, n in (("train", 16), ("val", 6), ("test", 6)):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
            for cls, name in enumerate(("NORMAL", "PNEUMONIA")):
                folder = root / split / name
                folder.mkdir(parents=True)
                for i in np.flatnonzero(labels == cls)[: n // 2]:
                    Image.fromarray(images[i]).save(folder / f"img_{i:04d}.png")
    (root / "README.txt").write_text("not data")
    return root


def test_npz_object_gives_the_same_dataset_as_the_local_file(gcs_bucket, tiny_npz, tmp_path):
    uri = f"{gcs_bucket}/data/tiny.npz"
    storage.upload_file(tiny_npz, uri)
    config = DataConfig(class_names=("normal", "pneumonia"))
    remote = data.prepare_dataset(uri, tmp_path / "remote", config)
    local = data.prepare_dataset(str(tiny_npz), tmp_path / "local", config)
    assert remote.source == uri
    assert remote.content_hash == local.content_hash
    assert remote.counts == local.counts
    assert not list(tmp_path.glob("remote/*.npz"))  # the download did not stay behind


def test_image_folder_prefix_gives_the_same_dataset_as_the_local_tree(
    gcs_bucket, image_tree, tmp_path
):
    uri = f"{gcs_bucket}/chest_xray"
    storage.copy_tree(image_tree, uri)
    config = DataConfig()
    remote = data.prepare_dataset(uri + "/", tmp_path / "remote", config)
    local = data.prepare_dataset(str(image_tree), tmp_path / "local", config)
    assert remote.class_names == ("NORMAL", "PNEUMONIA")
    assert (
        remote.counts
        == local.counts
        == {s: {"NORMAL": n, "PNEUMONIA": n} for s, n in (("train", 8), ("val", 3), ("test", 3))}
    )
    assert remote.content_hash == local.content_hash
    x, y = data.load_arrays(tmp_path / "remote", "test")
    assert x.shape == (6, 28, 28, 1) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_images_are_streamed_with_bounded_prefetch(gcs_bucket, image_tree, monkeypatch):
    uri = f"{gcs_bucket}/chest_xray"
    storage.copy_tree(image_tree, uri)
    _, splits = data._open_gcs(uri, DataConfig())
    real = storage.read_bytes
    fetched = []
    lock = threading.Lock()

    def counting(target, **kwargs):
        out = real(target, **kwargs)
        with lock:
            fetched.append(target)
        return out

    monkeypatch.setattr(storage, "read_bytes", counting)
    train = splits["train"]
    reader = train.read(np.arange(len(train.labels)))
    for consumed, _ in enumerate(reader, start=1):
        # Never more than the prefetch window ahead of the consumer.
        assert len(fetched) <= consumed + data._PREFETCH
        if consumed == 3:
            break
    reader.close()
    assert len(fetched) <= 3 + data._PREFETCH < len(train.labels)


def test_missing_bucket_object_and_prefix_are_clear_errors(gcs_bucket, tmp_path):
    config = DataConfig()
    with pytest.raises(FileNotFoundError, match=r"gs://no-such-bucket-x2/d\.npz: bucket"):
        data.prepare_dataset("gs://no-such-bucket-x2/d.npz", tmp_path / "a", config)
    with pytest.raises(FileNotFoundError, match=rf"No such object: {gcs_bucket}/missing\.npz"):
        data.prepare_dataset(f"{gcs_bucket}/missing.npz", tmp_path / "b", config)
    with pytest.raises(FileNotFoundError, match=rf"no objects under {gcs_bucket}/nothing/"):
        data.prepare_dataset(f"{gcs_bucket}/nothing", tmp_path / "c", config)
    with pytest.raises(FileNotFoundError, match=r"bucket 'no-such-bucket-x2'"):
        data.prepare_dataset("gs://no-such-bucket-x2/tree", tmp_path / "d", config)
    assert not list(tmp_path.iterdir())


def test_bad_layout_and_corrupt_objects_name_the_uri(
    gcs_emulator, gcs_bucket, image_tree, tmp_path
):
    uri = f"{gcs_bucket}/tree"
    storage.copy_tree(image_tree, uri)
    storage.write_bytes(f"{uri}/train/NORMAL/notes.txt", b"x")
    with pytest.raises(
        data.DataError, match=rf"File {uri}/train/NORMAL/notes\.txt is not an image"
    ):
        data.prepare_dataset(uri, tmp_path / "a", DataConfig())
    storage.remove(f"{uri}/train/NORMAL/notes.txt")
    storage.write_bytes(f"{uri}/train/NORMAL/broken.png", b"not a png")
    with pytest.raises(
        data.DataError, match=rf"Cannot decode image {uri}/train/NORMAL/broken\.png"
    ):
        data.prepare_dataset(uri, tmp_path / "b", DataConfig())
    storage.remove(f"{uri}/train/NORMAL/broken.png")
    victim = sorted(storage.list_uri(f"{uri}/test/PNEUMONIA"))[0]
    stored = gcs_emulator.object_path(f"{uri}/test/PNEUMONIA/{victim}")
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    with pytest.raises(storage.ChecksumError, match=rf"{uri}/test/PNEUMONIA/{victim}"):
        data.prepare_dataset(uri, tmp_path / "c", DataConfig())
    assert not list(tmp_path.iterdir())


def test_permission_error_names_the_uri(gcs_bucket, tiny_npz, tmp_path, monkeypatch):
    from google.api_core import exceptions as api

    storage.upload_file(tiny_npz, f"{gcs_bucket}/tiny.npz")

    def forbidden(self, *args, **kwargs):
        raise api.Forbidden("caller does not have storage.objects.get access")

    monkeypatch.setattr("google.cloud.storage.blob.Blob.download_to_file", forbidden)
    with pytest.raises(PermissionError, match=rf"Permission denied to read {gcs_bucket}/tiny\.npz"):
        data.prepare_dataset(f"{gcs_bucket}/tiny.npz", tmp_path / "out", DataConfig())


def test_errors_about_an_npz_object_name_its_uri(gcs_bucket, tiny_npz, tmp_path):
    # Raised while reading the arrays, and later, planning the splits (the download is gone).
    with np.load(tiny_npz) as archive:
        arrays = dict(archive)
    one_class = {**arrays, "test_labels": np.zeros_like(arrays["test_labels"])}
    float_labels = {**arrays, "val_labels": arrays["val_labels"].astype(np.float32)}
    for name, content, message in (
        ("one_class", one_class, r"'class_1' .* no images in split 'test' \(URI test_images\)"),
        ("float", float_labels, r"URI: val_labels must hold integer class indices"),
    ):
        np.savez(tmp_path / f"{name}.npz", **content)
        uri = f"{gcs_bucket}/bad/{name}.npz"
        storage.upload_file(tmp_path / f"{name}.npz", uri)
        with pytest.raises(data.DataError, match=message.replace("URI", uri)) as err:
            data.prepare_dataset(uri, tmp_path / name, DataConfig())
        assert "source.npz" not in str(err.value)
        assert not (tmp_path / name).exists()
