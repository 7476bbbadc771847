"""Every plot writes a real PNG of the expected size, atomically; bad inputs are rejected."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from cycleprune import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_width=200, min_height=200):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # an actual drawing, not an empty canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width >= min_width and height >= min_height
        # Not a blank image: more than one colour on the canvas.
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or [0, 1]) > 1
    assert not list(path.parent.glob(".tmp-*"))
    return width, height


def test_plot_lr_finder(tmp_path):
    lrs = np.geomspace(1e-5, 10, 60)
    losses = 1.0 - 0.5 * np.tanh(np.log10(lrs) + 3) + 0.05 * np.sin(np.arange(60))
    losses[-5:] = np.linspace(2, 10, 5)
    smoothed = np.convolve(losses, np.ones(3) / 3, mode="same")
    out = plots.plot_lr_finder(lrs, losses, smoothed, 1e-3, 1e-1, tmp_path / "lr.png")
    assert out == tmp_path / "lr.png"
    assert _check_png(out) == (640, 400)


def test_plot_lr_finder_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        plots.plot_lr_finder([1e-3, 1e-2], [1.0], [1.0], None, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lrs"):
        plots.plot_lr_finder([0.0, 1e-2], [1.0, 0.5], [1.0, 0.5], None, None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_lr_finder([], [], [], None, None, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_schedule(tmp_path):
    step = 10
    it = np.arange(80)
    cycle = np.floor(1 + it / (2 * step))
    x = np.abs(it / step - 2 * cycle + 1)
    lrs = 1e-3 + (1e-1 - 1e-3) * np.maximum(0, 1 - x)
    assert _check_png(plots.plot_schedule(lrs, tmp_path / "sched.png"), 200, 150)


@pytest.mark.parametrize("as_rows", [True, False])
def test_plot_history_accepts_both_layouts(tmp_path, as_rows):
    cols = {
        "loss": [0.9, 0.6, 0.4],
        "val_loss": [1.0, 0.7, 0.6],
        "accuracy": [0.6, 0.8, 0.9],
        "val_accuracy": [0.55, 0.75, 0.8],
        "auc": [0.7, 0.85, 0.95],
        "val_auc": [0.65, 0.8, 0.9],
        "lr": [0.1, 0.01, 0.001],
    }
    history = (
        {"epochs": [{k: v[i] for k, v in cols.items()} for i in range(3)]} if as_rows else cols
    )
    out = plots.plot_history(history, tmp_path / "hist.png")
    width, _ = _check_png(out, 200, 200)
    assert width == 1200  # three panels (loss, accuracy, auc) of 4 inches; lr is not a panel


def test_plot_history_without_metrics_fails(tmp_path):
    with pytest.raises(ValueError, match="no metric"):
        plots.plot_history({"epochs": [{"lr": 0.1}]}, tmp_path / "h.png")


def test_plot_sparsity(tmp_path):
    steps = np.arange(0, 100, 10)
    sparsity = 0.5 * (1 - (1 - np.clip(steps / 80, 0, 1)) ** 3)
    assert _check_png(plots.plot_sparsity(steps, sparsity, tmp_path / "s.png"), 200, 150)


def test_plot_confusion(tmp_path):
    out = plots.plot_confusion([[50, 10], [5, 35]], ["normal", "pneumonia"], tmp_path / "cm.png")
    _check_png(out)
    with pytest.raises(ValueError, match="class_names"):
        plots.plot_confusion([[1, 2], [3, 4]], ["a"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion([[1, 2, 3]], ["a"], tmp_path / "bad.png")


def test_plot_roc(tmp_path):
    fpr = [0.0, 0.1, 0.3, 1.0]
    tpr = [0.0, 0.6, 0.9, 1.0]
    _check_png(plots.plot_roc(fpr, tpr, 0.87, tmp_path / "roc.png"))
    _check_png(plots.plot_roc(fpr, tpr, float("nan"), tmp_path / "roc_nan.png"))


def test_plot_size_vs_accuracy(tmp_path):
    entries = [
        {"name": "keras", "gzip_bytes": 400_000, "accuracy": 0.90},
        {"name": "tflite_dynamic", "gzip_bytes": 90_000, "accuracy": 0.89},
        {"name": "tflite_int8", "gzip_bytes": 80_000, "accuracy": 0.88},
    ]
    _check_png(plots.plot_size_vs_accuracy(entries, tmp_path / "sva.png"))
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_size_vs_accuracy([{"name": "x", "accuracy": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_size_vs_accuracy([], tmp_path / "bad.png")


def test_plot_overwrites_existing_file(tmp_path):
    target = tmp_path / "sub" / "roc.png"
    target.parent.mkdir()
    target.write_bytes(b"stale")
    plots.plot_roc([0, 1], [0, 1], 0.5, target)
    assert target.read_bytes().startswith(PNG_SIGNATURE)


def test_png_to_data_uri_round_trips(tmp_path):
    out = plots.plot_schedule([0.1, 0.2, 0.1], tmp_path / "s.png")
    uri = plots.png_to_data_uri(out)
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix) :]) == out.read_bytes()
    (tmp_path / "not.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="Not a PNG"):
        plots.png_to_data_uri(tmp_path / "not.png")
