"""Atomic outputs: a reader sees the whole file or folder, or nothing."""

from __future__ import annotations

import os
import stat

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
    with storage.atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # invisible until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_failure_leaves_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_non_empty_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with (
        pytest.raises(FileExistsError, match="not empty"),
        storage.atomic_dir(tmp_path / "out", overwrite=False),
    ):
        pass


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
