"""PNG figures for the pipeline's reports: LR range test, schedule, history, sparsity, evaluation.

Every function takes plain data (lists or numpy arrays) and an output path, renders with
matplotlib's object API on an Agg canvas (no pyplot, so no global figure state and no display
needed), and writes the PNG atomically through :func:`cycleprune.storage.atomic_write_bytes`. It
returns the written :class:`~pathlib.Path`. matplotlib is imported inside the functions so that
importing this module stays cheap.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cycleprune import storage

_DPI = 100
_TRAIN_COLOR = "tab:blue"
_VAL_COLOR = "tab:orange"
# Per-epoch keys that are bookkeeping, not metrics to plot as train/val curves.
_NOT_METRICS = frozenset({"epoch", "lr", "learning_rate", "momentum", "step", "global_step"})
_METRIC_ORDER = ("loss", "accuracy", "auc")


def _figure(width: float = 6.4, height: float = 4.0, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    # Fixed metadata keeps the bytes reproducible (no creation software/version stamp).
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return storage.atomic_write_bytes(path, buffer.getvalue())


def _vector(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"Argument `{name}` must not be empty. Received: {name}={values!r}")
    return array


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"len({k})={v}" for k, v in lengths.items())
        raise ValueError(f"Arguments must have the same length. Received: {described}")


def plot_lr_finder(
    lrs: Any,
    losses: Any,
    smoothed: Any,
    min_lr: float | None,
    max_lr: float | None,
    path: str | os.PathLike,
) -> Path:
    """Plot an LR range test: raw and smoothed loss against the learning rate (log x axis).

    Vertical dashed lines mark the suggested CLR bounds (Smith, "Cyclical Learning Rates for
    Training Neural Networks", 2017, section 3.3).

    Args:
        lrs: Learning rate of each step (all > 0).
        losses: Raw training loss of each step.
        smoothed: Smoothed loss of each step.
        min_lr, max_lr: Suggested bounds; ``None`` leaves the line out.
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: empty or mismatched inputs, a learning rate <= 0.
    """
    lrs_a = _vector("lrs", lrs)
    losses_a = _vector("losses", losses)
    smoothed_a = _vector("smoothed", smoothed)
    _same_length(lrs=lrs_a, losses=losses_a, smoothed=smoothed_a)
    if np.any(lrs_a <= 0):
        raise ValueError(f"Argument `lrs` must be > 0 for a log axis. Received: min={lrs_a.min()}")
    fig, (ax,) = _figure()
    ax.plot(lrs_a, losses_a, color="0.7", linewidth=1, label="loss")
    ax.plot(lrs_a, smoothed_a, color=_TRAIN_COLOR, linewidth=2, label="smoothed loss")
    ax.set_xscale("log")
    finite = smoothed_a[np.isfinite(smoothed_a)]
    if finite.size:
        # Diverged tails would flatten the interesting part of the curve.
        low, high = float(finite.min()), float(np.percentile(finite, 95))
        span = max(high - low, 1e-6)
        ax.set_ylim(low - 0.1 * span, high + 0.5 * span)
    for value, name, color in ((min_lr, "min_lr", "tab:green"), (max_lr, "max_lr", "tab:red")):
        if value is not None and value > 0:
            ax.axvline(value, color=color, linestyle="--", linewidth=1.5)
            ax.annotate(
                f"{name}={value:.2g}",
                xy=(value, 0.98),
                xycoords=("data", "axes fraction"),
                xytext=(-3, 0),
                textcoords="offset points",
                rotation=90,
                ha="right",
                va="top",
                color=color,
                fontsize=9,
            )
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_schedule(lrs_per_step: Any, path: str | os.PathLike) -> Path:
    """Plot a learning-rate schedule: LR against the iteration.

    Args:
        lrs_per_step: Learning rate at each iteration (e.g. from
            :func:`cycleprune.schedules.clr`).
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: empty input.
    """
    lrs = _vector("lrs_per_step", lrs_per_step)
    fig, (ax,) = _figure(height=3.2)
    ax.plot(np.arange(lrs.size), lrs, color=_TRAIN_COLOR)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _history_columns(history: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Normalise ``{"epochs": [{...}, ...]}`` or ``{"loss": [...], ...}`` to numeric columns."""
    epochs = history.get("epochs")
    if isinstance(epochs, Sequence) and not isinstance(epochs, (str, bytes)):
        rows = list(epochs)
        if rows and not all(isinstance(r, Mapping) for r in rows):
            raise ValueError(
                "history['epochs'] must be a list of per-epoch dicts. "
                f"Received: {type(rows[0]).__name__} items"
            )
        keys = sorted({k for r in rows for k in r})
        columns = {k: np.array([_as_float(r.get(k)) for r in rows], dtype=np.float64) for k in keys}
    else:
        columns = {}
        for key, values in history.items():
            if isinstance(values, Sequence | np.ndarray) and not isinstance(values, (str, bytes)):
                try:
                    columns[key] = np.asarray(values, dtype=np.float64).reshape(-1)
                except (TypeError, ValueError):
                    continue
    return {k: v for k, v in columns.items() if v.size and np.isfinite(v).any()}


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_history(history: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Plot training curves: one panel per metric, train and validation per epoch.

    Args:
        history: Either ``{"epochs": [{"loss": .., "val_loss": .., ...}, ...]}`` (the format of
            ``history.json``) or a Keras-style dict of lists ``{"loss": [...], "val_loss": [...]}``.
            Loss, accuracy and AUC come first; other metrics follow; LR/momentum are skipped.
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: no plottable metric in ``history``.
    """
    if not isinstance(history, Mapping):
        raise ValueError(f"Argument `history` must be a mapping. Received: {type(history)}")
    columns = _history_columns(history)
    bases = sorted(
        {k.removeprefix("val_") for k in columns} - _NOT_METRICS,
        key=lambda m: (_METRIC_ORDER.index(m) if m in _METRIC_ORDER else len(_METRIC_ORDER), m),
    )
    if not bases:
        raise ValueError(
            f"Argument `history` holds no metric to plot. Received keys: {sorted(history)}"
        )
    fig, axes = _figure(width=4.0 * len(bases), height=3.4, ncols=len(bases))
    for ax, metric in zip(axes, bases, strict=True):
        for key, label, color in (
            (metric, "train", _TRAIN_COLOR),
            (f"val_{metric}", "val", _VAL_COLOR),
        ):
            if key in columns:
                values = columns[key]
                ax.plot(np.arange(1, values.size + 1), values, "o-", ms=3, color=color, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_sparsity(steps: Any, sparsity: Any, path: str | os.PathLike) -> Path:
    """Plot the pruning schedule's sparsity (fraction of zero weights) against the step.

    Args:
        steps: Optimizer steps.
        sparsity: Sparsity at each step, in [0, 1].
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: empty or mismatched inputs.
    """
    steps_a = _vector("steps", steps)
    sparsity_a = _vector("sparsity", sparsity)
    _same_length(steps=steps_a, sparsity=sparsity_a)
    fig, (ax,) = _figure(height=3.2)
    ax.plot(steps_a, sparsity_a, color=_TRAIN_COLOR, drawstyle="steps-post")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity")
    ax.set_title("Pruning schedule")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_confusion(cm: Any, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Plot a confusion matrix (rows = true class, columns = predicted) with counts and row %.

    Args:
        cm: Square matrix of counts, ``cm[i][j]`` = true ``i`` predicted ``j``.
        class_names: One name per class.
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: a non-square matrix, or a class-name count that does not match it.
    """
    matrix = np.asarray(cm, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"Argument `cm` must be a non-empty square matrix. Received: {cm!r}")
    names = [str(n) for n in class_names]
    if len(names) != matrix.shape[0]:
        raise ValueError(
            f"Argument `class_names` must have {matrix.shape[0]} entries. Received: {names}"
        )
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = matrix.shape[0]
    fig, (ax,) = _figure(width=max(3.6, 1.3 * k + 2), height=max(3.2, 1.2 * k + 1.6))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    for i in range(k):
        for j in range(k):
            color = "white" if share[i, j] > 0.5 else "black"
            text = f"{matrix[i, j]:.0f}\n{100 * share[i, j]:.1f}%"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=10)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    return _save(fig, path)


def plot_roc(fpr: Any, tpr: Any, auc: float | None, path: str | os.PathLike) -> Path:
    """Plot a ROC curve (TPR = sensitivity against FPR = 1 - specificity) with the chance line.

    Args:
        fpr, tpr: Points of the curve, same length.
        auc: Area under the curve, shown in the legend (``None`` or NaN: not shown).
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: empty or mismatched inputs.
    """
    fpr_a = _vector("fpr", fpr)
    tpr_a = _vector("tpr", tpr)
    _same_length(fpr=fpr_a, tpr=tpr_a)
    label = "ROC" if auc is None or not math.isfinite(auc) else f"ROC (AUC = {auc:.3f})"
    fig, (ax,) = _figure(width=4.4, height=4.2)
    ax.plot(fpr_a, tpr_a, color=_TRAIN_COLOR, linewidth=2, label=label)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curve")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_size_vs_accuracy(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Scatter compressed size (gzip, log scale) against accuracy, one labelled point per model.

    Args:
        entries: Dicts with ``name``, ``gzip_bytes`` (> 0) and ``accuracy``.
        path: Output PNG path.

    Returns:
        The written path.

    Raises:
        ValueError: no entries, a missing key, or a size <= 0.
    """
    if not entries:
        raise ValueError(f"Argument `entries` must not be empty. Received: entries={entries!r}")
    names, sizes, accuracies = [], [], []
    for i, entry in enumerate(entries):
        missing = [k for k in ("name", "gzip_bytes", "accuracy") if k not in entry]
        if missing:
            raise ValueError(f"entries[{i}] lacks {missing}. Received: {dict(entry)!r}")
        if not float(entry["gzip_bytes"]) > 0:
            raise ValueError(
                f"entries[{i}]['gzip_bytes'] must be > 0. Received: {entry['gzip_bytes']!r}"
            )
        names.append(str(entry["name"]))
        sizes.append(float(entry["gzip_bytes"]) / 1024.0)
        accuracies.append(float(entry["accuracy"]))
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (ax,) = _figure()
    ax.scatter(sizes, accuracies, color=_TRAIN_COLOR, zorder=3)
    # Models that land on (almost) the same point get their labels stacked, not overprinted.
    logs = np.log10(sizes)
    near_x = 0.04 * max(float(np.ptp(logs)), 0.1)
    near_y = 0.04 * max(float(np.ptp(accuracies)), 0.01)
    for i, (name, x, y) in enumerate(zip(names, sizes, accuracies, strict=True)):
        row = sum(
            abs(logs[j] - logs[i]) < near_x and abs(accuracies[j] - y) < near_y for j in range(i)
        )
        ax.annotate(name, (x, y), xytext=(5, 4 + 11 * row), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(plain)
    # Minor ticks unlabelled: on a log axis spanning a decade or more their labels collide.
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel("gzip size (KiB, log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title("Size vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def png_to_data_uri(path: str | os.PathLike) -> str:
    """Return a PNG file as a ``data:image/png;base64,...`` URI for HTML/Markdown embedding.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a PNG.
    """
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"Not a PNG file: {path}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
