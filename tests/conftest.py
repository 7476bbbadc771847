"""Shared fixtures: small real slices of the bundled PneumoniaMNIST, and fast TF settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_NPZ = ROOT / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="session")
def bundled_npz() -> Path:
    return BUNDLED_NPZ


def _stratified_take(images: np.ndarray, labels: np.ndarray, n: int, seed: int):
    rng = np.random.default_rng(seed)
    flat = labels.reshape(-1)
    picks = []
    for cls in np.unique(flat):
        idx = np.flatnonzero(flat == cls)
        share = max(2, round(n * len(idx) / len(flat)))
        picks.append(rng.choice(idx, size=min(share, len(idx)), replace=False))
    order = rng.permutation(np.concatenate(picks))
    return images[order], labels[order]


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """A stratified slice of the real data: 240 train, 80 val, 80 test images."""
    out = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    with np.load(BUNDLED_NPZ) as src:
        arrays = {}
        for split, n in (("train", 240), ("val", 80), ("test", 80)):
            x, y = _stratified_take(src[f"{split}_images"], src[f"{split}_labels"], n, seed=0)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(out, **arrays)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_npz, tmp_path_factory) -> Path:
    """``tiny_npz`` prepared by the data stage (TFRecords + dataset.json)."""
    from cycleprune import data
    from cycleprune.config import DataConfig

    out = tmp_path_factory.mktemp("prepared") / "dataset"
    data.prepare_dataset(str(tiny_npz), str(out), DataConfig())
    return out


@pytest.fixture(scope="session")
def train_tiny_model():
    """A factory: the tiny VGG briefly trained on a prepared dataset, with spread-out outputs.

    Class-balanced weights keep it from collapsing onto the majority class, and BatchNorm's
    moving statistics are set from a training batch (two short epochs leave them near their
    initial values, so every inference output would be ~0.5 and argmax comparisons vacuous).
    """

    def train(dataset_dir, seed: int = 0, epochs: int = 2):
        from cycleprune import data, models
        from cycleprune.compat import keras
        from cycleprune.config import ModelConfig

        x, y = data.load_arrays(dataset_dir, "train")
        x = x.astype(np.float32)
        keras.utils.set_random_seed(seed)
        model = models.build_model(
            ModelConfig(width=0.125, batch_norm=True), x.shape[1:], 2, seed=seed
        )
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
        counts = np.bincount(y, minlength=2)
        weights = {c: len(y) / (2 * counts[c]) for c in range(2)}
        onehot = np.eye(2, dtype=np.float32)[y]
        model.fit(x, onehot, batch_size=32, epochs=epochs, class_weight=weights, verbose=0)
        norms = [
            layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
        ]
        for layer in norms:
            layer.momentum = 0.0
        model(x[:128], training=True)
        for layer in norms:
            layer.momentum = 0.99
        return model

    return train


class GCSEmulator:
    """A running gcp-storage-emulator: its URL and where it keeps objects on disk."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir = url, data_dir

    def create_bucket(self, name: str) -> str:
        from cycleprune import storage

        storage._gcs_client().create_bucket(name)
        return f"gs://{name}"

    def object_path(self, uri: str) -> Path:
        """The file behind an object (to corrupt it behind the server's back)."""
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        return self.data_dir / ".cloudstorage" / bucket / name


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator process on a free loopback port, for the whole session.

    STORAGE_EMULATOR_HOST points the client (and subprocesses) at it; it is stopped at the end.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    data_dir = tmp_path_factory.mktemp("gcs-emulator")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir.parent / "gcs-emulator.log"
    command = [sys.executable, "-m", "gcp_storage_emulator", "-d", str(data_dir), "start"]
    command += ["--host", "127.0.0.1", "--port", str(port), "-q"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"The GCS emulator exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"The GCS emulator did not start in 30 s: {log_path}")
                time.sleep(0.05)
        patch = pytest.MonkeyPatch()
        patch.setenv("STORAGE_EMULATOR_HOST", url)
        patch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        yield GCSEmulator(url, data_dir)
        patch.undo()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def gcs_bucket(gcs_emulator, request) -> str:
    """A new, empty bucket (``gs://NAME``) on the emulator."""
    import re
    import uuid

    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return gcs_emulator.create_bucket(f"{stem}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def recording_split_reads():
    """A factory: a context manager recording every split ``data.load_arrays`` reads.

    ``with recording_split_reads() as splits: ...`` leaves the split names in ``splits``.
    """
    import contextlib

    @contextlib.contextmanager
    def record():
        from cycleprune import data

        splits: list[str] = []
        real = data.load_arrays

        def spy(dataset_dir, split):
            splits.append(split)
            return real(dataset_dir, split)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(data, "load_arrays", spy)
            yield splits

    return record
