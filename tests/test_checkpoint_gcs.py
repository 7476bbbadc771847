"""Checkpoints in a bucket: run_training with a gs:// checkpoint_dir resumes from it."""

from __future__ import annotations

import dataclasses

import pytest

from cycleprune import mirror, storage
from cycleprune.config import preset

STEPS = 8  # ceil(240 tiny training images / batch 32)


def _config(epochs: int):
    config = preset("smoke")
    return config.replace(
        train=dataclasses.replace(config.train, epochs=epochs, whole_cycles=False),
        schedule=dataclasses.replace(config.schedule, step_size_epochs=1.5),
    )


def test_mirrored_dir_local_path_is_used_as_is(tmp_path):
    with mirror.mirrored_dir(tmp_path / "ck") as local:
        assert local.path == tmp_path / "ck"
        local.sync()  # a no-op
    assert not (tmp_path / "ck").exists()


def test_mirrored_dir_publishes_to_alternating_slots(gcs_bucket, tmp_path):
    uri = storage.join_uri(gcs_bucket, "ck", "x")
    with mirror.mirrored_dir(uri) as local:
        (local.path / "a.txt").write_text("one")
        local.sync()
        (local.path / "a.txt").write_text("two")
        (local.path / "b.txt").write_text("b")
        local.sync()
    assert storage.read_manifest(f"{uri}/slot-0")["metadata"] == {"sequence": 1}
    assert storage.read_manifest(f"{uri}/slot-1")["metadata"] == {"sequence": 2}
    # A publish killed half-way leaves slot-0 incomplete: the newest complete state wins.
    storage.remove(f"{uri}/slot-1/{storage.MANIFEST}")
    with mirror.mirrored_dir(uri) as local:
        assert (local.path / "a.txt").read_text() == "one"
        assert not (local.path / "b.txt").exists()
        (local.path / "c.txt").write_text("c")
    # ... and the next publish goes to the other slot, keeping slot-0 intact until it is done.
    assert storage.read_manifest(f"{uri}/slot-1")["metadata"] == {"sequence": 2}
    with mirror.mirrored_dir(uri) as local:
        assert sorted(p.name for p in local.path.iterdir()) == ["a.txt", "c.txt"]


def test_mirrored_dir_publishes_on_an_exception(gcs_bucket):
    uri = storage.join_uri(gcs_bucket, "ck", "y")
    with pytest.raises(RuntimeError), mirror.mirrored_dir(uri) as local:
        (local.path / "a.txt").write_text("kept")
        raise RuntimeError("boom")
    with mirror.mirrored_dir(uri) as local:
        assert (local.path / "a.txt").read_text() == "kept"


def test_run_training_resumes_from_a_gcs_checkpoint_dir(gcs_bucket, tiny_dataset, tmp_path):
    from cycleprune import training

    uri = storage.join_uri(gcs_bucket, "ck", "train")
    kwargs = dict(min_lr=1e-3, max_lr=1e-1, checkpoint_dir=uri)
    first = training.run_training(tiny_dataset, tmp_path / "one", _config(1), **kwargs)
    assert (first.epochs_run, first.global_step) == (1, STEPS)
    slots = [f"{uri}/{slot}" for slot in mirror.SLOTS]
    assert any(storage.is_complete(slot) for slot in slots)

    second = training.run_training(tiny_dataset, tmp_path / "two", _config(2), **kwargs)
    assert second.epochs_run == 1
    assert second.global_step == 2 * STEPS
    epochs = second.history["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[0] == first.history["epochs"][0]
    assert all(storage.is_complete(slot) for slot in slots)
    names = storage.list_uri(slots[1])
    assert "ckpt-2.json" in names and "checkpoint" in names
    assert (tmp_path / "two" / "model.keras").is_file()
