"""Atomic outputs: a reader sees the whole file or folder, or nothing."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from cycleprune import storage


def test_atomic_write_json_round_trip_and_mode(tmp_path):
    path = storage.atomic_write_json(tmp_path / "a" / "m.json", {"b": 1, "a": [1.5]})
    assert storage.read_json(path) == {"a": [1.5], "b": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with storage.atomic_dir(out, replaces="old.txt") as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # invisible until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_leaves_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with (
        pytest.raises(RuntimeError, match="boom"),
        storage.atomic_dir(out, replaces="keep.txt") as tmp,
    ):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _can_swap(folder):
    a, b = folder / "probe-a", folder / "probe-b"
    a.mkdir()
    b.mkdir()
    return storage._exchange(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_atomic_dir_never_leaves_the_output_missing(tmp_path, monkeypatch):
    """Killed while the new folder moves in, a run leaves the old output or the new, never none."""
    if not _can_swap(tmp_path):  # an old glibc, musl, or a file system without the swap
        pytest.skip("this system cannot swap two folders in one step")
    (tmp_path / "probe-a").rmdir()
    (tmp_path / "probe-b").rmdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("old")
    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", killed_at_the_second_rename)
    with (
        contextlib.suppress(KeyboardInterrupt),
        storage.atomic_dir(out, replaces="model.txt") as tmp,
    ):
        (tmp / "model.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_swaps_by_two_renames_where_the_system_cannot_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_renameat2", False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("old")
    with storage.atomic_dir(out, replaces="model.txt") as tmp:
        (tmp / "model.txt").write_text("new")
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_non_empty_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with (
        pytest.raises(FileExistsError, match="not empty"),
        storage.atomic_dir(tmp_path / "out", overwrite=False),
    ):
        pass


@pytest.mark.parametrize("replaces", [None, "dataset.json"])
def test_atomic_dir_never_replaces_a_folder_that_is_not_its_output(tmp_path, replaces):
    out = tmp_path / "data"
    out.mkdir()
    (out / "source.npz").write_bytes(b"precious")
    ran = []
    with (
        pytest.raises(FileExistsError, match=r"data is not empty and holds .*refusing"),
        storage.atomic_dir(out, replaces=replaces),
    ):
        ran.append(True)
    assert ran == []  # refused before the block: no work is done and then thrown away
    assert (out / "source.npz").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (out / "dataset.json").write_text("{}")  # a previous output of this kind
    with storage.atomic_dir(out, replaces="dataset.json") as tmp:
        (tmp / "dataset.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"]


@pytest.mark.parametrize("uri", ["gs://bucket/ds", Path("gs://bucket/ds")])
def test_local_writers_refuse_gcs_uris(tmp_path, monkeypatch, uri):
    # Path("gs://b/x") folds to "gs:/b/x": written as is, it would be a local folder "gs:".
    monkeypatch.chdir(tmp_path)
    with (
        pytest.raises(ValueError, match=r"gs:/+bucket/ds is a gs:// URI"),
        storage.atomic_dir(uri),
    ):
        pass
    with pytest.raises(ValueError, match="gs:// URI"):
        storage.atomic_write_text(uri, "x")
    assert list(tmp_path.iterdir()) == []


def test_writers_remove_stale_temporaries_of_their_own_name_only(tmp_path):
    old = time.time() - storage.STALE_SECONDS - 60
    stale_dir = tmp_path / ".tmp-out.abcd1234"
    stale_dir.mkdir()
    (stale_dir / "half.bin").write_bytes(b"x" * 10)
    stale_old = tmp_path / ".tmp-out.old-4242"
    stale_old.mkdir()
    young = tmp_path / ".tmp-out.zzzz9999"  # maybe a writer still at work
    young.mkdir()
    other = tmp_path / ".tmp-out.keras.abcd1234"  # another name's temporary
    other.write_bytes(b"y")
    stale_file = tmp_path / ".tmp-m.json.q1w2e3r4"
    stale_file.write_bytes(b"{")
    for path in (stale_dir, stale_old, other, stale_file):
        os.utime(path, (old, old))
    with storage.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    storage.atomic_write_json(tmp_path / "m.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", "m.json", young.name, other.name]
    )


def test_umask_is_read_without_changing_it():
    mask = os.umask(0o027)
    try:
        assert storage._umask() == 0o027
    finally:
        os.umask(mask)


def test_read_json_names_a_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "dataset.json"
    bad.write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"dataset\.json is not valid JSON"):
        storage.read_json(bad)


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        storage.read_json(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        storage.read_json(tmp_path / "missing.json")


def test_tree_size(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"12345")
    (tmp_path / "d" / "b").write_bytes(b"123")
    assert storage.tree_size(tmp_path / "d") == 8
    assert storage.tree_size(tmp_path / "d" / "a") == 5
